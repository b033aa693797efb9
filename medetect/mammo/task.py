"""The mammography task (``task: mammography``): a Faster R-CNN whose classes are the lesion types ``benign`` and
``malignant``, trained like any detector (:mod:`medetect.detection`) on a mini-MIAS-layout folder; its predict adds
per-image scores, its evaluate the lesion FROC and image / lesion ROC AUC with patient-bootstrap intervals."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..detection.config import ExperimentConfig
from ..detection.predict import predict_detections
from ..detection.train import evaluate_model, predict_dataset, run_training
from ..engine.tasks import PredictOptions, Task
from ..schema import option
from . import CLASSES
from .evaluate import evaluate_mammography, format_mammo_report

__all__ = ["MammographyConfig", "TASK", "predict_mammography"]


@dataclass
class MammographyConfig(ExperimentConfig):
    task: str = option("mammography", doc="selects this schema: a detector of benign and malignant lesions",
                       choices=("mammography",))

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        names = list(self.model.class_names or self.data.classes)
        if names and names != list(CLASSES):
            raise ValueError(f"model.class_names must be {list(CLASSES)} for task: mammography, got {names}")


def lesion_validation(model, data, *, device=None) -> dict:
    """The validation metrics of a mammography training run (and so of ``medetect train --folds``): the detection
    keys of :func:`medetect.detection.train.evaluate_model` plus ``val_lesion_sensitivity_1fp`` (lesion sensitivity
    at 1 false positive per image), ``val_lesion_froc_mean``, ``val_image_auc_abnormal`` and
    ``val_image_auc_malignant`` (:func:`medetect.evaluation.mammo.mammo_metrics`, no bootstrap). A lesion is the
    circle inscribed in its box (the mini-MIAS boxes are the circles' bounding squares); an image's label is its
    record's ``image_label`` (normal / benign / malignant). An undefined value (one class only) is NaN, which the log
    leaves out of the best epoch."""

    from ..evaluation.mammo import mammo_metrics

    out = evaluate_model(model, data, device=device)
    was_training = model.training
    preds, gts = predict_dataset(model, data, device=device)
    model.train(was_training)
    d = gts[0]["boxes"].shape[-1] // 2 if gts else 2  # mammograms are 2D; the lesion geometry is any d
    boxes = [g["boxes"].double().numpy().reshape(-1, 2 * d) for g in gts]
    centres = [(b[:, :d] + b[:, d:]) / 2 for b in boxes]
    radii = [(b[:, d:] - b[:, :d]).mean(1) / 2 for b in boxes]
    malignant = [g["labels"].numpy() == CLASSES.index("malignant") for g in gts]
    labels = [str(r.meta.get("image_label") or ("malignant" if m.any() else "benign" if len(m) else "normal"))
              for r, m in zip(data.records, malignant)]
    res = mammo_metrics(preds, centres, radii, malignant, labels, [str(i) for i in range(len(preds))],
                        malignant_label=CLASSES.index("malignant"), n_boot=0)

    def num(v):
        return float("nan") if v is None else float(v)

    out.update({"val_lesion_sensitivity_1fp": num(res["lesion_sensitivity"].get("1")),
                "val_lesion_froc_mean": num(res["lesion_froc_mean"]),
                "val_image_auc_abnormal": num(res["image_auc_abnormal"]),
                "val_image_auc_malignant": num(res["image_auc_malignant"])})
    return out


def train_mammography(cfg: MammographyConfig, run_dir: Path, **kw) -> dict:
    """The mammography task's ``train``: the detection trainer validated with :func:`lesion_validation`, the best
    epoch picked by the lesion FROC mean."""
    history = run_training(cfg, Path(run_dir), validate=lesion_validation, best_metric="val_lesion_froc_mean", **kw)
    return dict(history[-1]) if history else {}


def predict_mammography(loaded, inputs, out_dir: Path, options: PredictOptions) -> list[Path]:
    """The detector's outputs (:func:`medetect.detection.predict.predict_detections`) and ``image_scores.csv``:
    ``input,p_abnormal,p_malignant``, the highest score of any / of the malignant detections (0 without), as Ribli et
    al. score an image by its most suspicious lesion."""
    rows = []
    malignant = list(loaded.classes).index("malignant")

    def image_score(path, det):
        sc, mal = det["scores"].float(), det["labels"] == malignant
        rows.append((str(path), float(sc.max()) if len(sc) else 0.0, float(sc[mal].max()) if bool(mal.any()) else 0.0))

    written = predict_detections(loaded, inputs, out_dir, options, per_image=image_score)
    with open(Path(out_dir) / "image_scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["input", "p_abnormal", "p_malignant"])
        w.writerows(rows)
    return written


TASK = Task(
    name="mammography",
    summary="Lesion detection in mammograms with benign / malignant classes (mini-MIAS-layout folders): lesion FROC, "
            "image ROC AUC (abnormal, malignant) and lesion AUC with patient-bootstrap intervals; predict adds "
            "image_scores.csv.",
    config=MammographyConfig,
    model_kinds=("detector",),
    train=train_mammography,
    predict=predict_mammography,
    evaluate=evaluate_mammography,
    report=format_mammo_report,
    formats=("csv", "coco", "dicom-sr"),
    overlays=True,
    tiles=True,
    tta=True,
)
