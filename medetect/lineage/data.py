"""The data every lineage step trains and is evaluated on: one split of an annotated 2D dataset, decoded once and
resized once to the lineage's working scale, held in memory (BCCD: 205 + 87 images of 640x480, 0.5 -> 320x240).

A :class:`LineageSet` is a plain record: ``images[i]`` float ``[C, H, W]`` with the file's values (0..255 for 8-bit
pictures), ``boxes[i]`` float ``[G, 4]`` in the medetect convention ``(y0, x0, y1, x1)`` at the working scale,
``labels[i]`` long ``[G]`` in ``0..K-1`` (indices of ``class_names``), ``ids[i]`` the image's name. Boxes are those of
the annotation file scaled by ``scale`` (exact: ``medetect.data.transforms.scale``); nothing is dropped here (the
dataset reader reports what it skips).

Every step normalises with :func:`normalise` (the one intensity rule of the lineage: ``(x / 255 - 0.5) / 0.25``, the
shipped BCCD detector's) so that all rows of the table see the same input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.formats import open_dataset, parse_data_spec, source_from_spec
from ..data.transforms import scale as scale_sample

__all__ = ["LineageSet", "load_split", "normalise", "MEAN", "STD", "MAX_VALUE"]

MAX_VALUE, MEAN, STD = 255.0, 0.5, 0.25


@dataclass
class LineageSet:
    images: list[torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    ids: list[str]
    class_names: list[str]
    scale: float = 1.0
    spec: str = ""
    report: object = None  # the reader's AnnotationReport (what it skipped or clipped, counted)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_objects(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def subset(self, index: Sequence[int]) -> "LineageSet":
        idx = list(index)
        return LineageSet([self.images[i] for i in idx], [self.boxes[i] for i in idx], [self.labels[i] for i in idx],
                          [self.ids[i] for i in idx], list(self.class_names), self.scale, self.spec, self.report)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """``[C, ...]`` or ``[B, C, ...]`` raw values (0..255) -> the network's input (any device, float32)."""
    return (image.float() / MAX_VALUE - MEAN) / STD


def load_split(spec: str, *, scale: float = 0.5, classes: Sequence[str] = (), channels: int = 3) -> LineageSet:
    """``FOLDER:SPLIT`` (VOC layout) or ``FORMAT:PATH:SPLIT`` -> a :class:`LineageSet` at ``scale``.
    ``classes`` fixes the class order (a model's); empty: the dataset's own."""
    if not 0 < scale <= 4:
        raise ValueError(f"scale must be in (0, 4], got {scale}")
    fmt, path, split = parse_data_spec(spec)
    if fmt == "coco" and "{split}" not in path:
        split = "all"
    ds = open_dataset(**source_from_spec(fmt, path), split=split, classes=classes, channels=channels)
    images, boxes, labels, ids = [], [], [], []
    for i in range(len(ds)):
        s = ds[i]
        if s["image"].dim() != 3:
            raise ValueError(f"{ds.records[i].image}: the lineage is 2D; this image has shape {tuple(s['image'].shape)}")
        if scale != 1.0:
            s = scale_sample({"image": s["image"].float(), "boxes": s["boxes"].float(), "labels": s["labels"],
                              "spacing": (1.0, 1.0)}, scale)
        images.append(s["image"].float().clamp_(0, MAX_VALUE).contiguous())
        boxes.append(s["boxes"].float().reshape(-1, 4))
        labels.append(s["labels"].long().reshape(-1))
        ids.append(str(ds.records[i].image))
    return LineageSet(images, boxes, labels, ids, list(ds.classes), float(scale), spec, getattr(ds, "report", None))
