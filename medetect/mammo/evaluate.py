"""``medetect evaluate --weights W --data FOLDER:SPLIT`` for a ``benign``/``malignant`` lesion detector on a
mini-MIAS-layout folder (``images.csv``, ``annotations.csv``, ``<split>.txt``; :mod:`medetect.attention.data`)."""

from __future__ import annotations

from pathlib import Path

from ..attention.data import read_lesion_folder
from ..data.io import read_image
from ..engine.predictor import Predictor
from ..evaluation.mammo import mammo_metrics
from . import CLASSES

__all__ = ["is_mammo_folder", "evaluate_mammo"]


def is_mammo_folder(folder) -> bool:
    """A mini-MIAS-layout folder: ``images.csv`` and ``annotations.csv`` side by side."""
    f = Path(folder)
    return (f / "images.csv").is_file() and (f / "annotations.csv").is_file()


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
    predictor = Predictor(loaded.model, device=device)
    dets = []
    for r in recs:
        det = predictor.predict_image(read_image(r.path), loaded.preprocess, allow_range_mismatch=allow_range_mismatch)
        dets.append({k: det[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels")})
    res = mammo_metrics(dets, [r.centres for r in recs], [r.radii for r in recs], [r.malignant for r in recs],
                        [r.image_label for r in recs], [r.patient for r in recs],
                        malignant_label=names.index("malignant"), n_boot=n_boot, seed=seed, plot_dir=plot_dir)
    res["unlocated_findings"] = int(sum(r.unlocated for r in recs))
    res["split"] = split
    return res
