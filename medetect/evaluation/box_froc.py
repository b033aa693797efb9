"""FROC of box detections per image / scan (lesion-style data: DeepLesion, NIH boxes, nodule cubes): sensitivity
against the average number of false positives per image, class-agnostic, a detection being a hit when its IoU with
a not yet matched ground-truth box exceeds ``iou_threshold`` (the VOC matching of
:func:`~medetect.evaluation.detection.evaluate_voc`, all labels merged). The summary is the sensitivities at
1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per image and their mean, the CPM of the LUNA16 protocol (whose hit test
is a distance, :mod:`medetect.evaluation.froc`; here it is box IoU, DeepLesion's usage)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .detection import evaluate_voc

__all__ = ["box_froc", "FP_RATES"]

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def box_froc(preds: Sequence[Mapping], gts: Sequence[Mapping], *, iou_threshold: float = 0.5) -> dict:
    """``{"sensitivity_at": {rate: value}, "cpm", "iou_threshold", "images", "lesions"}`` for per-image
    ``preds`` (``boxes``, ``scores``, ``labels``) and ``gts`` (``boxes``, ``labels``), any d."""
    def merged(items, with_scores):
        out = []
        for it in items:
            n = len(it["boxes"])
            m = {"boxes": it["boxes"], "labels": torch.zeros(n, dtype=torch.long)}
            if with_scores:
                m["scores"] = it["scores"]
            out.append(m)
        return out

    res = evaluate_voc(merged(preds, True), merged(gts, False), iou_threshold=iou_threshold, num_classes=1)
    n_images, npos = len(gts), int(res["num_gt"][0])
    rec = np.asarray(res["recall"][0], dtype=np.float64)
    ctp = rec * npos if npos else np.zeros_like(rec)
    cfp = np.arange(1, len(rec) + 1) - ctp  # every detection is a TP or an FP (no difficult boxes here)
    fppi = cfp / max(n_images, 1)
    sens = {}
    for r in FP_RATES:
        ok = fppi <= r
        sens[r] = float(rec[ok].max()) if ok.any() and npos else 0.0
    return {"sensitivity_at": {str(k): v for k, v in sens.items()}, "cpm": float(np.mean(list(sens.values()))),
            "iou_threshold": iou_threshold, "images": n_images, "lesions": npos}
