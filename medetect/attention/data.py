"""The training dataset of the attention task: images of a mini-MIAS-layout folder
(:mod:`medetect.data.lesion_folder`) with their image labels and lesion-circle heatmaps. An abnormal image whose
findings have no location (mdb059, mdb245) contributes only to the classification loss (``has_heatmap`` False) and is
left out of the localisation metrics.
"""

from __future__ import annotations


import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.io import read_image
from ..data.lesion_folder import LesionImage
from ..data.preprocess import prepare
from ..heatmaps import SIGMA_FACTOR, circle_heatmap
from ..models.io import Preprocess

__all__ = ["CLASSES", "LesionImages", "attention_collate"]

CLASSES = ("abnormal", "malignant")


class LesionImages(Dataset):
    """Prepared images (the model's :class:`Preprocess`: intensity and ``scale``), labels and circle heatmaps.

    Sample: ``{"image": [C, *S], "labels": [K], "heatmap": [*S] (peak 1, zeros when none), "has_heatmap": bool,
    "index": int}``. ``flip``: random flips along every spatial axis (circles follow). Images are prepared once
    and kept in memory (224 mammograms at 256 x 256 are 60 MB)."""

    def __init__(self, records: list[LesionImage], pre: Preprocess, *, flip: bool = False,
                 sigma_factor: float = SIGMA_FACTOR, seed: int = 0):
        self.records, self.pre, self.flip, self.sigma_factor = records, pre, flip, sigma_factor
        self._cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.records)

    def prepared(self, i: int) -> tuple[torch.Tensor, np.ndarray]:
        """``(tensor [C, *S], zoom per axis)`` of image ``i`` (cached)."""
        if i not in self._cache:
            p = prepare(read_image(self.records[i].path), self.pre)
            self._cache[i] = (p.tensor.float(), np.asarray(p.zoom, dtype=np.float64))
        return self._cache[i]

    def circles(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Circle centres on the prepared grid ``[N, d]``, radii in input pixels ``[N]``, spacing ``1 / zoom``."""
        _, zoom = self.prepared(i)
        r = self.records[i]
        return r.centres * zoom, r.radii, 1.0 / zoom

    def __getitem__(self, i: int) -> dict:
        x, _ = self.prepared(i)
        c, rad, sp = self.circles(i)
        shape = tuple(x.shape[1:])
        if self.flip:
            axes = [a for a in range(len(shape)) if self.rng.random() < 0.5]
            if axes:
                x = x.flip([1 + a for a in axes])
                c = c.copy()
                c[:, axes] = np.asarray(shape, dtype=np.float64)[axes] - c[:, axes]
        has = len(rad) > 0
        hm = (circle_heatmap(torch.as_tensor(c), torch.as_tensor(rad), shape, spacing=sp,
                             sigma_factor=self.sigma_factor) if has else torch.zeros(shape))
        return {"image": x, "labels": torch.from_numpy(self.records[i].labels), "heatmap": hm,
                "has_heatmap": torch.tensor(has), "index": i}


def attention_collate(samples: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """Stack same-size images ``[B, C, *S]``; targets stay a list of per-image dicts."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"all images of a batch need the same shape after preprocessing, got {sorted(shapes)}")
    return torch.stack([s["image"] for s in samples]), [{k: v for k, v in s.items() if k != "image"} for s in samples]
