"""FROC of box detections per image / scan (lesion-style data: DeepLesion, NIH boxes, nodule cubes): sensitivity
against the average number of false positives per image, class-agnostic (all labels merged), any d.

It is the library's FROC core (:mod:`medetect.evaluation.froc_core`) with the box IoU hit test, DeepLesion's
evaluation rules: a detection hits a ground-truth box when their IoU is at least ``iou_threshold``; a ground truth
counts once, found by its best-scoring hit (a detection that hits several ground truths finds them all); a detection
that hits only already found ground truths is neither a TP nor a FP; every other detection is a FP. The curve has a
point per distinct score (tied detections enter together); the summary is the sensitivities at
:data:`~medetect.evaluation.froc_core.CPM_FP_RATES` (1/8 .. 8) false positives per image, read with exact integer
counts, and their mean, the CPM of the LUNA16 protocol (whose hit test is a distance, :mod:`medetect.evaluation.froc`).
Without any ground-truth box the sensitivities and the CPM are ``None``, with the reason in ``"undefined"`` (the
convention of :mod:`medetect.evaluation.froc_core`)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .detection import _prepare
from .froc_core import CPM_FP_RATES, as_float64, box_iou_hit, match, note_undefined, set_metric

__all__ = ["box_froc", "FP_RATES"]

FP_RATES = CPM_FP_RATES


def _host(item: Mapping, keys: Sequence[str]) -> dict:
    """The entries ``keys`` of one image, floating tensors (bfloat16 included) as float64 arrays."""
    if not isinstance(item, Mapping):
        return item  # _prepare names the bad entry
    out = {}
    for k in keys:
        if k in item:
            v = item[k]
            out[k] = as_float64(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return out


def box_froc(preds: Sequence[Mapping], gts: Sequence[Mapping], *, iou_threshold: float = 0.5) -> dict:
    """``{"sensitivity_at": {rate: value}, "cpm", "iou_threshold", "images", "lesions", "undefined"}`` for per-image
    ``preds`` (``boxes``, ``scores``, ``labels``) and ``gts`` (``boxes``, ``labels``), any d (module docstring)."""
    hit = box_iou_hit(iou_threshold)
    data = _prepare([_host(p, ("boxes", "scores")) for p in preds], [_host(g, ("boxes",)) for g in gts])
    n_images = len(gts)
    det_image = np.repeat(np.arange(n_images), [len(s) for s in data.dt_scores])
    gt_image = np.repeat(np.arange(n_images), [len(b) for b in data.gt_boxes])
    cat = [np.concatenate([np.zeros((0, 2 * data.d))] + lst) for lst in (data.dt_boxes, data.gt_boxes)]
    m = match(det_image, np.concatenate([np.zeros(0)] + data.dt_scores), cat[0], gt_image, cat[1], hit, n_images)
    n_les = int(m.lesions_per_image.sum())
    sens = m.points().sensitivity_at(FP_RATES)
    res: dict = {"sensitivity_at": {}}
    reason = "no ground-truth box: the sensitivity is undefined"
    for r, v in zip(FP_RATES, sens):
        res["sensitivity_at"][str(r)] = float(v) if n_les else None
        if not n_les:
            note_undefined(res, f"sensitivity_at/{r}", reason)
    set_metric(res, "cpm", float(np.mean(sens)), reason)
    res.update(iou_threshold=iou_threshold, images=n_images, lesions=n_les)
    res["undefined"] = res.pop("undefined", {})
    return res
