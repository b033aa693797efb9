"""The detection task (``task: detection``, the default): a 2D or 3D detector (Faster R-CNN, RetinaNet, YOLO-style)
trained on an annotated dataset in any format of :mod:`medetect.data.formats`.

``config.py`` (its config: ``model``, ``train``, ``data``), ``train.py`` (datasets, transforms, :func:`run_training`),
``predict.py`` (detections of every input: CSV, JSON and the ``--format`` writers of ``outputs.py``), ``evaluate.py``
(VOC / COCO mAP, box FROC). Tasks that detect lesions (mammography, the LUNA16 stage one) build on these parts.
"""

from ..engine.tasks import Task
from .config import DataConfig, ExperimentConfig
from .evaluate import evaluate_detector, format_detection_report
from .predict import predict_detections
from .train import train_detection

__all__ = ["DataConfig", "ExperimentConfig", "TASK"]


def _predict(loaded, inputs, out_dir, options):
    return predict_detections(loaded, inputs, out_dir, options)


TASK = Task(
    name="detection",
    summary="A 2D or 3D detector (Faster R-CNN, RetinaNet, YOLO-style) on an annotated dataset (VOC, COCO, CSV, MONAI "
            "datalist, ...): boxes with class scores; VOC / COCO mAP and box FROC.",
    config=ExperimentConfig,
    model_kinds=("detector",),
    train=train_detection,
    predict=_predict,
    evaluate=evaluate_detector,
    report=format_detection_report,
    formats=("csv", "coco", "slicer", "dicom-sr"),
    overlays=True,
    tiles=True,
    tta=True,
)
