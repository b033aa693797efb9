"""``medetect evaluate``: VOC / COCO mAP of a model on a Pascal VOC folder, through the one predict path."""

from __future__ import annotations

from pathlib import Path

from ..convert import Geometry
from ..data.annotations import read_voc_folder
from ..data.datasets import DetectionDataset
from ..data.image import MedicalImage
from ..engine.predictor import Predictor
from ..evaluation.detection import evaluate_detections, evaluate_voc
from .models import load_model

__all__ = ["evaluate_spec"]


def _organ_spec(spec: str):
    from ..organs.report import is_organ_folder

    if is_organ_folder(spec):
        return spec, None
    folder, _, cases = spec.rpartition(":")
    if folder and is_organ_folder(folder):
        return folder, [c for c in cases.split(",") if c]
    return None


def _evaluate_organs(weights, folder: str, cases, *, device=None) -> dict:
    from ..organs.localiser import ORGAN_TASK
    from ..organs.report import evaluate_organ_folder

    loaded = load_model(weights, device=device)
    if loaded.kind != "detector" or loaded.meta.get("extra", {}).get("task") != ORGAN_TASK:
        raise ValueError(f"{weights}: {folder} is an organ folder (boxes.csv, volumes/); it needs an organ localiser "
                         "(a model trained with task: organ-localisation)")
    return evaluate_organ_folder(loaded, folder, cases=cases)


def evaluate_spec(weights, spec: str, *, device=None, plot_dir=None, allow_range_mismatch: bool = False,
                  saliency: str | None = None, n_boot: int = 1000) -> dict:
    """Evaluate on ``FOLDER:SPLIT`` (a Pascal VOC folder); returns VOC/COCO mAP and per-class AP@0.5. An
    ``attention`` model is scored on a mini-MIAS-layout folder instead (:mod:`medetect.attention.evaluate`;
    ``saliency``: ``attention`` or ``gradcam``, default the model's own; ``n_boot`` bootstrap draws). An
    ``organ-ct-sample``-layout folder (``FOLDER`` or ``FOLDER:CASE[,CASE..]``) with an organ localiser gives the
    per-organ metrics of :func:`medetect.organs.report.evaluate_organ_folder`."""
    organs = _organ_spec(spec)
    if organs is not None:
        return _evaluate_organs(weights, *organs, device=device)
    if ":" not in spec:
        raise ValueError(f"--data must be FOLDER:SPLIT (e.g. ../shared/data/bccd:val), got {spec!r}")
    folder, split = spec.rsplit(":", 1)
    loaded = load_model(weights, device=device)
    if loaded.kind == "attention":  # image labels + lesion circles (a mini-MIAS-layout folder)
        from ..attention.evaluate import evaluate_attention

        return evaluate_attention(loaded, folder, split, method=saliency, n_boot=n_boot)
    if loaded.kind != "detector":
        raise ValueError(f"{weights}: evaluate needs a detector, this model is a {loaded.kind!r}")
    if loaded.preprocess.ndim != 2:
        raise ValueError(f"{weights}: a {loaded.preprocess.ndim}D model; a VOC folder holds 2D images (use a 2D model, "
                         "or medetect froc for LUNA16-style marks)")
    names = list(loaded.classes)
    records, report = read_voc_folder(folder, split, classes=names)
    ds = DetectionDataset(records=records, root=folder, classes=names)
    if len(ds) == 0:
        raise ValueError(f"{spec}: the split lists no images")
    predictor = Predictor(loaded.model, device=device)
    preds, gts = [], []
    for i in range(len(ds)):
        s = ds.raw_sample(i, dtype=None)  # stored dtype: the range check sees what the file holds
        img = MedicalImage(s["image"], Geometry.identity(s["image"].ndim - 1), path=str(ds.records[i].image))
        det = predictor.predict_image(img, loaded.preprocess, allow_range_mismatch=allow_range_mismatch)
        preds.append({"boxes": det["boxes"].float(), "scores": det["scores"], "labels": det["labels"]})
        gts.append({"boxes": s["boxes"], "labels": s["labels"]})
    res = evaluate_detections(preds, gts, class_names=names)  # the one set of metric keys (validation: val_ + key)
    if plot_dir:
        from ..evaluation.plots import pr_curve_png

        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        pr_curve_png(evaluate_voc(preds, gts, class_names=names), Path(plot_dir) / "pr_voc50.png", class_names=names)
    return {**res, "skipped_zero_size": report.skipped_zero_size}
