"""Evaluation: VOC/COCO mAP for any d, LUNA16 FROC/CPM (``medetect.evaluation.froc.froc``), PR-curve plots. Every
lesion FROC (LUNA16, mammography, attention, box) runs on the one FROC core, :mod:`medetect.evaluation.froc_core`.

The FROC function is not re-exported here: it would shadow its module ``medetect.evaluation.froc``."""

from .detection import COCO_IOU_THRESHOLDS, COCO_RECALL_THRESHOLDS, DetectionEvaluator, evaluate_coco, evaluate_voc, voc_ap
from .froc import FROCResult, plot_froc
from .plots import pr_curve_png

__all__ = [
    "evaluate_voc", "evaluate_coco", "voc_ap", "DetectionEvaluator", "COCO_IOU_THRESHOLDS", "COCO_RECALL_THRESHOLDS",
    "FROCResult", "plot_froc", "pr_curve_png",
]
