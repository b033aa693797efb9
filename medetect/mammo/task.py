"""The mammography task (``task: mammography``): a Faster R-CNN whose classes are the lesion types ``benign`` and
``malignant``, trained like any detector (:mod:`medetect.detection`) on a mini-MIAS-layout folder; its predict adds
per-image scores, its evaluate the lesion FROC and image / lesion ROC AUC with patient-bootstrap intervals."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..detection.config import ExperimentConfig
from ..detection.predict import predict_detections
from ..detection.train import train_detection
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
    train=train_detection,
    predict=predict_mammography,
    evaluate=evaluate_mammography,
    report=format_mammo_report,
    formats=("csv", "coco", "dicom-sr"),
    overlays=True,
    tiles=True,
    tta=True,
)
