"""A mini-MIAS-layout folder -> image records with lesion circles, and the training dataset of the attention task.

Folder layout (``../shared/data/mini-mias``; the held-out set has the same layout)::

    images.csv       image_id, file, split, patient_id, image_label (normal / benign / malignant), ...
    annotations.csv  image_id, has_location, cx, cy, radius, [severity B|M], ... (one row per abnormality; normal images have none)
    <split>.txt      image ids of a split (optional: else the ``split`` column of images.csv)

Circles are ``(cy, cx)`` centres in top-left pixel coordinates (the README's convention, used directly as edge
coordinates, like :func:`medetect.data.annotations.read_mias`) and radii in pixels. Labels per image:
``abnormal`` (benign or malignant) and ``malignant``. An abnormal image whose findings have no location (mdb059,
mdb245) is kept with its labels and no circle: it contributes only to the classification loss (``has_heatmap``
False) and is left out of the localisation metrics. A located row with a radius <= 0 is an error naming the file and
line; one whose centre lies outside the image (images.csv ``width`` / ``height``, when given) is kept and warned
about, naming the file and line (a preprocessed copy can crop such a circle away: :mod:`medetect.mammo.preprocess`
counts it too).
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.io import read_image
from ..data.preprocess import prepare
from ..heatmaps import SIGMA_FACTOR, circle_heatmap
from ..models.io import Preprocess

__all__ = ["CLASSES", "LesionImage", "read_lesion_folder", "LesionImages", "attention_collate"]

CLASSES = ("abnormal", "malignant")


@dataclass
class LesionImage:
    image_id: str
    path: Path
    patient: str
    image_label: str  # normal | benign | malignant
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [N, d] (y, x) pixels
    radii: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [N] pixels
    unlocated: int = 0  # findings without a location
    malignant: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N] per located lesion (severity M)
    lesion_types: np.ndarray = field(default_factory=lambda: np.zeros(0, "<U4"))  # [N] abnormality (CALC, CIRC, ...)
    tissue: str = ""  # F / G / D (images.csv ``tissue``), "" when unknown
    side: str = ""  # L / R (images.csv ``side``), "" when unknown

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.image_label != "normal", self.image_label == "malignant"], dtype=np.float32)


def _read_csv(path: Path, need: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a mini-MIAS-layout folder needs images.csv and annotations.csv)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        r = csv.DictReader(fh)
        missing = [k for k in need if k not in (r.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column {missing[0]!r}")
        return [(i + 2, row) for i, row in enumerate(r)]


def read_lesion_folder(folder: str | Path, split: str) -> list[LesionImage]:
    """The images of ``split`` of a mini-MIAS-layout folder (module docstring), in images.csv order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such data folder")
    rows = _read_csv(folder / "images.csv", ("image_id", "file", "patient_id", "image_label"))
    ids_file = folder / f"{split}.txt"
    if ids_file.is_file():
        keep = {s.strip() for s in ids_file.read_text().split() if s.strip()}
        rows = [(n, r) for n, r in rows if r["image_id"] in keep]
    else:
        rows = [(n, r) for n, r in rows if r.get("split") == split]
    if not rows:
        raise ValueError(f"{folder}: split {split!r} lists no images (no {ids_file.name} and no images.csv row with "
                         f"split {split!r})")
    recs: dict[str, LesionImage] = {}
    sizes: dict[str, tuple[float, float]] = {}
    for n, r in rows:
        lab = r["image_label"]
        if lab not in ("normal", "benign", "malignant"):
            raise ValueError(f"{folder / 'images.csv'} line {n}: image_label must be normal, benign or malignant, "
                             f"got {lab!r}")
        try:
            sizes[r["image_id"]] = (float(r["height"]), float(r["width"]))
        except (KeyError, TypeError, ValueError):
            pass
        recs[r["image_id"]] = LesionImage(r["image_id"], folder / r["file"], r["patient_id"], lab,
                                          tissue=(r.get("tissue") or "").strip(), side=(r.get("side") or "").strip())
    ann = folder / "annotations.csv"
    circles: dict[str, list] = {}
    for n, r in _read_csv(ann, ("image_id", "has_location", "cx", "cy", "radius")):
        rec = recs.get(r["image_id"])
        if rec is None:
            continue
        if r["has_location"].strip() != "1":
            rec.unlocated += 1
            continue
        try:
            cy, cx, rad = float(r["cy"]), float(r["cx"]), float(r["radius"])
        except ValueError as e:
            raise ValueError(f"{ann} line {n}: cx, cy and radius must be numbers ({e})") from None
        if not rad > 0:
            raise ValueError(f"{ann} line {n}: radius must be > 0 for a located finding, got {rad:g}")
        hw = sizes.get(rec.image_id)
        if hw is not None and not (0 <= cy <= hw[0] and 0 <= cx <= hw[1]):
            warnings.warn(f"{ann} line {n}: lesion centre (y {cy:g}, x {cx:g}) lies outside the {hw[0]:g} x {hw[1]:g} "
                          f"image {rec.image_id}: kept", stacklevel=2)
        sev = (r.get("severity") or "").strip()
        if sev not in ("", "B", "M"):
            raise ValueError(f"{ann} line {n}: severity must be B or M, got {sev!r}")
        mal = sev == "M" if sev else rec.image_label == "malignant"  # no severity column: the image's label
        circles.setdefault(rec.image_id, []).append((cy, cx, rad, mal, (r.get("abnormality") or "").strip()))
    for iid, cs in circles.items():
        a = np.array([c[:3] for c in cs], dtype=np.float64)
        recs[iid].centres, recs[iid].radii = a[:, :2], a[:, 2]
        recs[iid].malignant = np.array([c[3] for c in cs], dtype=bool)
        recs[iid].lesion_types = np.array([c[4] for c in cs], dtype="<U4")
    for rec in recs.values():
        if rec.image_label == "normal" and len(rec.radii):
            raise ValueError(f"{ann}: image {rec.image_id} is labelled normal in images.csv but has located findings")
    return list(recs.values())


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
