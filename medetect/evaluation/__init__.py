"""Evaluation: VOC/COCO mAP for any d, LUNA16 FROC/CPM, PR-curve plots."""

from .detection import COCO_IOU_THRESHOLDS, COCO_RECALL_THRESHOLDS, DetectionEvaluator, evaluate_coco, evaluate_voc, voc_ap
from .froc import FROCResult, froc, plot_froc
from .plots import pr_curve_png

__all__ = [
    "evaluate_voc", "evaluate_coco", "voc_ap", "DetectionEvaluator", "COCO_IOU_THRESHOLDS", "COCO_RECALL_THRESHOLDS",
    "froc", "FROCResult", "plot_froc", "pr_curve_png",
]
