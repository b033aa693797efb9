"""``medetect evaluate --weights W --data FOLDER:SPLIT`` for a ``benign``/``malignant`` lesion detector on a
mini-MIAS-layout folder (``images.csv``, ``annotations.csv``, ``<split>.txt``; :mod:`medetect.attention.data`)."""

from __future__ import annotations

from pathlib import Path

from ..attention.data import read_lesion_folder
from ..data.io import read_image
from ..engine.predictor import Predictor
from ..evaluation.mammo import mammo_metrics
from . import CLASSES

__all__ = ["is_mammo_folder", "detect_records", "evaluate_mammo", "read_detections_csv", "write_detections_csv"]

_DET_COLUMNS = ("image_id", "y0", "x0", "y1", "x1", "label", "score")


def is_mammo_folder(folder) -> bool:
    """A mini-MIAS-layout folder: ``images.csv`` and ``annotations.csv`` side by side."""
    f = Path(folder)
    return (f / "images.csv").is_file() and (f / "annotations.csv").is_file()


def detect_records(loaded, recs, *, device=None, allow_range_mismatch: bool = False) -> list[dict]:
    """The detector on each record's image (its own preprocessing): per image ``{"boxes" [M, 4] (y0, x0, y1, x1) on
    the input grid, "scores" [M], "labels" [M]}`` as numpy arrays."""
    predictor = Predictor(loaded.model, device=device)
    dets = []
    for r in recs:
        det = predictor.predict_image(read_image(r.path), loaded.preprocess, allow_range_mismatch=allow_range_mismatch)
        dets.append({k: det[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels")})
    return dets


def write_detections_csv(path, image_ids, dets, classes=CLASSES) -> None:
    """A cache of :func:`detect_records`: one row per detection ``image_id, y0, x0, y1, x1, label, score`` (label by
    name); an image without detections has no row. Written atomically."""
    import csv
    import os

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(_DET_COLUMNS)
        for iid, d in zip(image_ids, dets):
            for b, lab, sc in zip(d["boxes"].reshape(-1, 4).tolist(), d["labels"].tolist(), d["scores"].tolist()):
                w.writerow([iid, *(f"{v:.2f}" for v in b), classes[int(lab)], f"{sc:.6f}"])
    os.replace(tmp, p)


def read_detections_csv(path, image_ids, classes=CLASSES) -> list[dict]:
    """:func:`write_detections_csv`'s file -> detections in ``image_ids`` order (images without a row: none)."""
    import csv

    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such detections file")
    rows: dict[str, list] = {}
    with open(p, newline="") as fh:
        r = csv.DictReader(fh)
        if tuple(r.fieldnames or ()) != _DET_COLUMNS:
            raise ValueError(f"{p}: columns must be {','.join(_DET_COLUMNS)}")
        for n, row in enumerate(r, start=2):
            if row["label"] not in classes:
                raise ValueError(f"{p} line {n}: label must be one of {list(classes)}, got {row['label']!r}")
            rows.setdefault(row["image_id"], []).append(
                ([float(row[k]) for k in ("y0", "x0", "y1", "x1")], classes.index(row["label"]), float(row["score"])))
    out = []
    for iid in image_ids:
        rs = rows.get(iid, [])
        out.append({"boxes": np.array([x[0] for x in rs], dtype=np.float32).reshape(-1, 4),
                    "labels": np.array([x[1] for x in rs], dtype=np.int64),
                    "scores": np.array([x[2] for x in rs], dtype=np.float32)})
    return out


def evaluate_mammo(loaded, folder, split: str, *, device=None, n_boot: int = 1000, seed: int = 0,
                   plot_dir=None, allow_range_mismatch: bool = False) -> dict:
    """Lesion FROC, image AUC (abnormal, malignant), lesion AUC malignant vs benign, each with ``_ci`` (bootstrap by
    patient): :func:`medetect.evaluation.mammo.mammo_metrics`. ``loaded``: a detector whose classes are
    ``benign``, ``malignant``."""
    names = list(loaded.classes)
    if names != list(CLASSES):
        raise ValueError(f"a mini-MIAS-layout folder is scored for a detector with the classes {list(CLASSES)}, this "
                         f"model has {names}")
    recs = read_lesion_folder(folder, split)
    dets = detect_records(loaded, recs, device=device, allow_range_mismatch=allow_range_mismatch)
    res = mammo_metrics(dets, [r.centres for r in recs], [r.radii for r in recs], [r.malignant for r in recs],
                        [r.image_label for r in recs], [r.patient for r in recs],
                        malignant_label=names.index("malignant"), n_boot=n_boot, seed=seed, plot_dir=plot_dir)
    res["unlocated_findings"] = int(sum(r.unlocated for r in recs))
    res["split"] = split
    return res
