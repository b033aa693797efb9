"""Mini-MIAS-layout lesion folders: screening images with an image label and lesion circles (the mammography and
attention tasks read them).

Folder layout (``../shared/data/mini-mias``; the held-out set has the same layout)::

    images.csv       image_id, file, split, patient_id, image_label (normal / benign / malignant), ...
    annotations.csv  image_id, has_location, cx, cy, radius, [severity B|M], ... (one row per abnormality; normal images have none)
    <split>.txt      image ids of a split (optional: else the ``split`` column of images.csv)

Circles are ``(cy, cx)`` centres in top-left pixel coordinates (the README's convention, used directly as edge
coordinates, like :func:`medetect.data.annotations.read_mias`) and radii in pixels. Labels per image:
``abnormal`` (benign or malignant) and ``malignant``. An abnormal image whose findings have no location (mdb059,
mdb245) is kept with its labels and no circle. A located row with a radius <= 0 is an error naming the file and
line; one whose centre lies outside the image (images.csv ``width`` / ``height``, when given) is kept and warned
about, naming the file and line.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["LesionImage", "is_lesion_folder", "read_lesion_folder"]


def is_lesion_folder(folder) -> bool:
    """Whether ``folder`` has the mini-MIAS layout (``images.csv`` and ``annotations.csv``)."""
    f = Path(folder)
    return (f / "images.csv").is_file() and (f / "annotations.csv").is_file()


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
