"""One entry point from "a dataset in format F at ROOT, split S" to a :class:`DetectionDataset`.

Used by ``medetect train`` (a config's ``data`` section), ``medetect evaluate --data`` and ``medetect convert``, so
every command reads every format the same way:

=================== ====================================================== =============================================
format              annotations                                            split
=================== ====================================================== =============================================
``voc``             ``ROOT/Annotations/*.xml`` (Pascal VOC)                ``ROOT/ImageSets/Main/<split>.txt``
``coco``            a COCO instances JSON (``annotations``)                ``{split}`` in the path, or ``all``
``csv``             one row per box (``annotations``, see                  a ``split`` column, ``{split}`` in the path,
                    :func:`~medetect.data.annotations.read_csv_boxes`)     or ``all``
``datalist``        a MONAI detection datalist JSON (``annotations``)      the JSON's keys (``training``, ...)
``mias``            the mini-MIAS folder (``annotations.csv``)             ``ROOT/<split>.txt``
``dsb2018``         the DSB2018 nuclei folder (``boxes.csv``)              ``ROOT/<split>.txt``
``luna16_patches``  the LUNA16-NODE21 patch folder (``patches.csv``)       ``all``
=================== ====================================================== =============================================

Image paths in the annotations are relative to ``images`` (default ``ROOT``). ``all`` is the split of formats
without one: every image of the file.

With ``folds`` (a :class:`~medetect.data.folds.Folds`, from the data config's ``folds`` keys) the training and
validation split names stand for the two sides of one cross-validation fold of their union
(:mod:`medetect.data.folds`); any other split is read as it is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .annotations import (
    AnnotationReport,
    csv_header,
    read_coco,
    read_csv_boxes,
    read_datalist,
    read_luna16_patches,
    read_voc_folder,
)
from .datasets import DetectionDataset, dsb2018, mini_mias
from .folds import Folds, fold_dataset
from .image import MedicalImage
from .io import read_image

__all__ = ["FORMATS", "ChannelReader", "open_dataset", "parse_data_spec", "source_from_spec"]

FORMATS = ("voc", "coco", "csv", "datalist", "mias", "dsb2018", "luna16_patches")


class ChannelReader:
    """``path -> MedicalImage`` with exactly ``channels`` channels (picklable, for DataLoader workers): grey from
    colour by the mean of the channels (rounded, dtype kept), colour from grey by repetition. Datasets mixing
    greyscale and RGB(A) files (NIH ChestX-ray14, DSB2018) then give one input shape."""

    def __init__(self, channels: int):
        self.channels = int(channels)

    def __call__(self, path) -> MedicalImage:
        img = read_image(path)
        c = img.array.shape[0]
        if c == self.channels:
            return img
        if self.channels == 1:
            a = img.array.astype(np.float64).mean(0, keepdims=True)
            a = np.rint(a) if np.issubdtype(img.array.dtype, np.integer) else a
            return dataclasses.replace(img, array=a.astype(img.array.dtype))
        if c == 1:
            return dataclasses.replace(img, array=np.repeat(img.array, self.channels, axis=0))
        raise ValueError(f"{path}: the image has {c} channels; data.channels {self.channels} can only be made from "
                         "1 channel (or 3 -> 1)")


def _split_path(annotations: str, split: str, fmt: str) -> Path:
    if not annotations:
        raise ValueError(f"data.annotations must name the {fmt} annotation file for format {fmt!r}")
    return Path(annotations.replace("{split}", split))


def _sorted_classes(records) -> tuple[str, ...]:
    return tuple(sorted({lab for r in records for lab in r.labels}))


def open_dataset(
    fmt: str,
    root: str | os.PathLike,
    split: str,
    *,
    annotations: str = "",
    images: str | os.PathLike = "",
    classes: Sequence[str] = (),
    box_mode: str = "",
    box_units: str = "voxel",
    clip: bool = False,
    transform: Callable | None = None,
    cache: bool = False,
    pre_transform: Callable | None = None,
    channels: int = 0,
    folds: Folds | None = None,
) -> DetectionDataset:
    """The dataset of ``split`` of a ``fmt`` dataset (see the module table). ``classes`` fixes the class list (and
    order); empty: the format's own list (COCO ``categories``, the named folders) or the sorted labels found.
    ``box_mode`` / ``box_units`` state a datalist's box convention (default ``xyxy`` / ``xyzxyz`` by the images'
    dimension is NOT guessed: a datalist needs ``box_mode``). ``channels`` > 0 converts every image to that many
    channels (:class:`ChannelReader`). The dataset's ``report`` holds what the reader skipped or clipped. With
    ``folds``, ``split`` = its training (validation) split gives the training folds (the held-out fold) of the pool
    of both splits, grouped by patient (:mod:`medetect.data.folds`)."""
    root = Path(root)
    img_root = Path(images) if images else root
    kw = dict(transform=transform, cache=cache, pre_transform=pre_transform)
    args = (annotations, img_root, tuple(classes) or None, box_mode, box_units, clip)
    side = folds.side(split) if folds is not None else None
    if side is None:
        ds = _open(fmt, root, split, *args, kw)
    else:
        parts = [_open(fmt, root, s, *args, {}) for s in folds.pool]
        ds = fold_dataset(parts, folds, side, fmt=fmt, **kw)
    if channels:
        ds.reader = ChannelReader(channels)
    return ds


def _open(fmt, root, split, annotations, img_root, given, box_mode, box_units, clip, kw) -> DetectionDataset:
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if fmt == "dsb2018":
        return dsb2018(root, split, **kw)
    if fmt == "mias":  # data.classes [benign, malignant]: the findings' severity as classes
        return mini_mias(root, split, severity=given == ("benign", "malignant"), **kw)
    if fmt == "voc":
        if given is None:
            raise ValueError("data.classes must list the class names for a VOC dataset")
        names = given
        records, report = read_voc_folder(root, split, classes=names, clip=clip)
    elif fmt == "coco":
        file = _split_path(annotations, split, fmt)
        if "{split}" not in annotations and split != "all":
            raise ValueError(f"data.annotations {annotations!r} holds one COCO file: use {{split}} in its path or "
                             f"the split 'all', not {split!r}")
        records, cats, report = read_coco(file, img_root, classes=given, clip=clip)
        names = given or tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))
    elif fmt == "csv":
        file = _split_path(annotations, split, fmt)
        where = None
        if "{split}" not in annotations and split != "all":
            if "split" not in csv_header(file):
                raise ValueError(f"{file}: no 'split' column to select split {split!r}; add one, use {{split}} in "
                                 "data.annotations, or use the split 'all'")
            where = {"split": split}
        records, report = read_csv_boxes(file, img_root, classes=given, clip=clip, where=where)
        if not records:
            raise ValueError(f"{file}: no rows for split {split!r}")
        names = given or _sorted_classes(records)
    elif fmt == "datalist":
        if not box_mode:
            raise ValueError("data.box_mode must state the datalist's box convention (xyzxyz, cccwhd, xyzwhd for 3D; "
                             "xyxy, ccwh, xywh for 2D)")
        records, report = read_datalist(_split_path(annotations, split, fmt), img_root, split, box_mode=box_mode,
                                        units=box_units, classes=given, clip=clip)
        names = given or _sorted_classes(records)
    elif fmt == "luna16_patches":
        if split != "all":
            raise ValueError(f"the LUNA16-NODE21 patch folder has one split, 'all', not {split!r}")
        records, report = read_luna16_patches(root)
        names = given or ("nodule",)
        img_root = root
    elif fmt == "luna":
        raise ValueError("whole LUNA16 scans train through task: luna-detection (configs/luna_detection.yaml), not "
                         "the detection task's data.format")
    else:
        raise ValueError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
    ds = DetectionDataset(records=records, root=img_root, classes=names, **kw)
    ds.report = report if isinstance(report, AnnotationReport) else AnnotationReport()
    return ds


def source_from_spec(fmt: str, path: str) -> dict:
    """The :func:`open_dataset` arguments of a command-line ``FORMAT:PATH``: for the formats with an annotation file
    (``coco``, ``csv``, ``datalist``) PATH is that file and image paths are relative to its folder; for the folder
    formats PATH is the dataset folder."""
    if fmt in ("coco", "csv", "datalist"):
        return {"fmt": fmt, "root": str(Path(path).parent), "annotations": path}
    return {"fmt": fmt, "root": path}


def parse_data_spec(spec: str) -> tuple[str, str, str]:
    """``FORMAT:PATH:SPLIT`` -> ``(format, path, split)``; ``FOLDER:SPLIT`` is a VOC folder. For the formats with an
    annotation file (``coco``, ``csv``, ``datalist``) PATH is that file and images are relative to its folder."""
    head, _, rest = spec.partition(":")
    if head in FORMATS and rest:
        path, sep, split = rest.rpartition(":")
        if not sep or not path or not split:
            raise ValueError(f"--data {spec!r} must be FORMAT:PATH:SPLIT (e.g. coco:ann/{{split}}.json:val)")
        return head, path, split
    path, sep, split = spec.rpartition(":")
    if not sep or not path or not split:
        raise ValueError(f"--data must be FORMAT:PATH:SPLIT (formats {list(FORMATS)}), FOLDER:SPLIT (a VOC folder) "
                         f"or a config YAML, got {spec!r}")
    return "voc", path, split
