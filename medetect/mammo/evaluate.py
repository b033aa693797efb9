"""``medetect evaluate --weights W --data FOLDER:SPLIT`` for a ``benign``/``malignant`` lesion detector on a
mini-MIAS-layout folder (``images.csv``, ``annotations.csv``, ``<split>.txt``; :mod:`medetect.data.lesion_folder`),
and the terminal report of its metrics."""

from __future__ import annotations

from pathlib import Path

from ..data.io import read_image
from ..data.lesion_folder import read_lesion_folder
from ..detection.predict import predict_named
from ..engine.predictor import Predictor
from ..engine.tasks import EvaluateOptions
from ..evaluation.mammo import image_scores, mammo_metrics, youden_thresholds
from . import CLASSES

__all__ = ["detect_records", "mammo_metrics_for", "evaluate_mammo", "evaluate_mammography", "format_mammo_report",
           "read_detections_csv", "write_detections_csv"]

_DET_COLUMNS = ("image_id", "y0", "x0", "y1", "x1", "label", "score")


def detect_records(loaded, recs, *, device=None, allow_range_mismatch: bool = False, tta: str | None = None) -> list[dict]:
    """The detector on each record's image (its own preprocessing; ``tta`` overrides the model's ``model.tta``): per
    image ``{"boxes" [M, 4] (y0, x0, y1, x1) on the input grid, "scores" [M], "labels" [M]}`` as numpy arrays."""
    predictor = Predictor(loaded.model, device=device, tta=tta)
    dets = []
    for r in recs:
        det = predict_named(predictor, read_image(r.path), loaded.preprocess, r.path,
                            allow_range_mismatch=allow_range_mismatch)
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


def mammo_metrics_for(recs, dets, *, train=None, train_split: str = "train", n_boot: int = 1000, seed: int = 0,
                      plot_dir=None) -> dict:
    """:func:`~medetect.evaluation.mammo.mammo_metrics` of the records ``recs`` (:func:`read_lesion_folder`) and their
    detections, with ``by_lesion_type``; ``train = (train_recs, train_dets)``: also ``confusion`` at the image
    thresholds of Youden's J on those TRAIN images (``youden_thresholds``; ``picked_on`` names the split)."""
    thresholds = None
    if train is not None:
        trecs, tdets = train
        pa, pm = image_scores(tdets, malignant_label=list(CLASSES).index("malignant"))
        thresholds = {**youden_thresholds(pa, pm, [r.image_label for r in trecs]), "picked_on": train_split,
                      "threshold_images": len(trecs)}
    return mammo_metrics(dets, [r.centres for r in recs], [r.radii for r in recs], [r.malignant for r in recs],
                         [r.image_label for r in recs], [r.patient for r in recs],
                         malignant_label=list(CLASSES).index("malignant"), n_boot=n_boot, seed=seed,
                         plot_dir=plot_dir, lesion_types=[r.lesion_types for r in recs], thresholds=thresholds)


def evaluate_mammo(loaded, folder, split: str, *, device=None, n_boot: int = 1000, seed: int = 0,
                   plot_dir=None, allow_range_mismatch: bool = False, threshold_split: str | None = "train",
                   tta: str | None = None) -> dict:
    """Lesion FROC, image AUC (abnormal, malignant), lesion AUC malignant vs benign, each with ``_ci`` (bootstrap by
    patient): :func:`medetect.evaluation.mammo.mammo_metrics`, plus ``by_lesion_type`` and ``confusion`` (image
    thresholds by Youden's J on the ``threshold_split`` images of the same folder, default ``train``: the detector
    also runs on them; ``None``, or a split the folder does not list: ``confusion`` is ``null`` and
    ``confusion_note`` says why). ``loaded``: a detector whose classes are ``benign``, ``malignant``."""
    names = list(loaded.classes)
    if names != list(CLASSES):
        raise ValueError(f"a mini-MIAS-layout folder is scored for a detector with the classes {list(CLASSES)}, this "
                         f"model has {names}")
    recs = read_lesion_folder(folder, split)
    dets = detect_records(loaded, recs, device=device, allow_range_mismatch=allow_range_mismatch, tta=tta)
    train, note = None, None
    if threshold_split:
        if threshold_split == split:
            train, note = (recs, dets), f"thresholds picked on the evaluated split {split!r} itself (optimistic)"
        else:
            try:
                trecs = read_lesion_folder(folder, threshold_split)
            except ValueError as e:
                note = f"no confusion table: {e}"
            else:
                train = (trecs, detect_records(loaded, trecs, device=device,
                                               allow_range_mismatch=allow_range_mismatch, tta=tta))
    else:
        note = "no confusion table: no threshold split asked"
    try:
        res = mammo_metrics_for(recs, dets, train=train, train_split=threshold_split or "", n_boot=n_boot, seed=seed,
                                plot_dir=plot_dir)
    except ValueError as e:
        if train is None or "Youden" not in str(e):
            raise
        res = mammo_metrics_for(recs, dets, n_boot=n_boot, seed=seed, plot_dir=plot_dir)
        note = f"no confusion table: {e}"
    res.setdefault("confusion", None)
    if note:
        res["confusion_note"] = note
    res["unlocated_findings"] = int(sum(r.unlocated for r in recs))
    res["split"] = split
    return res


def evaluate_mammography(loaded, spec: str, options: EvaluateOptions) -> dict:
    """The mammography task's ``evaluate``: ``--data FOLDER:SPLIT`` (a mini-MIAS-layout folder) through
    :func:`evaluate_mammo`."""
    folder, _, split = spec.rpartition(":")
    if not folder or not split:
        raise ValueError(f"--data must be FOLDER:SPLIT for a mammography model (a mini-MIAS-layout folder with "
                         f"images.csv and annotations.csv), got {spec!r}")
    return evaluate_mammo(loaded, folder, split, device=options.device, n_boot=options.n_boot,
                          plot_dir=options.plot_dir, allow_range_mismatch=options.allow_range_mismatch,
                          threshold_split=options.threshold_split, tta=options.tta)


def _ci(res: dict, k: str) -> str:
    lo, hi = res.get(f"{k}_ci") or (None, None)
    return f"({lo:.3f}-{hi:.3f})" if lo is not None else ""


def format_mammo_report(res: dict) -> str:
    """The terminal summary of :func:`evaluate_mammo`'s result."""
    lines = [f"images: {res['images']}  patients: {res['patients']}  lesions: {res['lesions']} "
             f"(detected {res['detected_lesions']})"]
    for k in ("lesion_froc_mean", "image_auc_abnormal", "image_auc_malignant", "lesion_auc_malignant"):
        lines.append(f"{k:>22s}: {res[k]:.4f} {_ci(res, k)}" if res[k] is not None else
                     f"{k:>22s}: undefined ({res.get('undefined', {}).get(k, 'one class only')})")
    lines.append("lesion sensitivity at FP/image: " + ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: undefined"
                                                               for k, v in res["lesion_sensitivity"].items()))
    if "by_lesion_type" in res:
        lines.append("at 1 FP/image, detected / lesions by type: " + ", ".join(
            f"{t} {v['detected']}/{v['lesions']}" for t, v in res["by_lesion_type"].items() if v["lesions"]))
    c = res.get("confusion")
    if c:
        lines.append(f"image confusion (rows true, columns predicted {'/'.join(c['labels'])}; thresholds by Youden on "
                     f"{c['picked_on']}: p_abnormal >= {c['t_abnormal']:.3f}, p_malignant >= {c['t_malignant']:.3f}):")
        lines += [f"  {name:>9s}: " + " ".join(f"{v:4d}" for v in row) for name, row in zip(c["labels"], c["matrix"])]
    elif res.get("confusion_note"):
        lines.append(res["confusion_note"])
    return "\n".join(lines)
