"""YOLO v1 single-shot grid head (Redmon et al., "You Only Look Once", CVPR 2016) for any d.

Shape key
    N  images in the batch     S_a  grid cells along axis a (M = prod S_a cells)     d  spatial dims
    B  boxes per cell          K    object classes                                   G  ground-truth boxes

One feature map (stride ``s`` per axis) is the grid: cell ``m`` covers ``[i_a * s_a, (i_a + 1) * s_a)``. Per cell the
head predicts B boxes, each ``d`` centre offsets inside the cell (in cell units, 0..1), ``d`` sizes as the square root
of the fraction of the input along each axis (0..1), and one confidence, plus ONE set of K conditional class
probabilities ``P(class | object)`` shared by the cell's boxes. The paper's last layer is linear; here offsets, sizes
and confidences go through a sigmoid and the class scores through a softmax, so every output lives in the range its
target does (the sum-squared loss then cannot be pushed by outputs far outside it when training from scratch).

Loss (the paper's Eq. 3, sum-squared errors summed over the batch and divided by N):

* the cell that holds an object's centre is responsible for it; a cell holds one object (the paper: "each grid cell
  only predicts two boxes and can only have one class"): when several centres fall in one cell the first listed
  ground truth is its object (the others are no target for this head);
* of the cell's B boxes, the one with the highest IoU with the object (current prediction) is the responsible
  predictor: ``lambda_coord`` (5) x squared errors of its offsets and square-root sizes, plus ``(C - IoU)^2`` for its
  confidence (target: the IoU of its predicted box with the object, not back-propagated through);
* every other box: ``lambda_noobj`` (0.5) x ``C^2``;
* cells with an object: squared error of the K class probabilities against the one-hot class.

Inference: class score = ``P(class | object) x C`` for each of the M x B boxes and K classes, scores above
``score_thresh``, per-class NMS (:func:`~medetect.boxes.batched_nms`), the best ``detections_per_img``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..boxes import batched_nms, box_sizes, clip_boxes
from ..layers.nd import conv, norm

__all__ = ["YoloHead", "LAMBDA_COORD", "LAMBDA_NOOBJ", "elementwise_iou"]

# The paper's weights: box coordinates count 5x, the confidence of boxes without an object 0.5x (most boxes have none).
LAMBDA_COORD = 5.0
LAMBDA_NOOBJ = 0.5
LEAKY_SLOPE = 0.1  # the paper's leaky rectified linear activation


def elementwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[..., 2d]`` and ``b[..., 2d]`` (broadcast), for any d."""
    d = a.shape[-1] // 2
    lo = torch.maximum(a[..., :d], b[..., :d])
    hi = torch.minimum(a[..., d:], b[..., d:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = box_sizes(a).clamp(min=0).prod(-1) + box_sizes(b).clamp(min=0).prod(-1) - inter
    return inter / union.clamp(min=1e-9)


class YoloHead(nn.Module):
    """Grid head + v1 loss + postprocessing; plugs into :class:`~medetect.models.detector.Detector` as a one-stage
    head (``forward(feats, image_shape, targets=None, with_detections=True) -> (detections, losses)``)."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        ndim: int,
        level: int,
        stride: int | Sequence[int],
        boxes_per_cell: int = 2,
        norm_kind: str = "group",
        lambda_coord: float = LAMBDA_COORD,
        lambda_noobj: float = LAMBDA_NOOBJ,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        d = ndim
        Conv = conv(d)
        self.tower = nn.Sequential(
            Conv(in_channels, in_channels, 3, padding=1), norm(norm_kind, d, in_channels), nn.LeakyReLU(LEAKY_SLOPE),
            Conv(in_channels, in_channels, 3, padding=1), norm(norm_kind, d, in_channels), nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.pred = Conv(in_channels, boxes_per_cell * (2 * d + 1) + num_classes, 1)
        nn.init.normal_(self.pred.weight, std=0.01)
        nn.init.zeros_(self.pred.bias)
        self.ndim, self.num_classes, self.boxes_per_cell, self.level = d, num_classes, boxes_per_cell, level
        self.stride = tuple(int(s) for s in stride) if isinstance(stride, (tuple, list)) else (int(stride),) * d
        self.lambda_coord, self.lambda_noobj = float(lambda_coord), float(lambda_noobj)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    # ------------------------------------------------------------------------------------------- outputs
    def outputs(self, feats: Sequence[torch.Tensor], image_shape: Sequence[int]) -> dict[str, torch.Tensor]:
        """The head's outputs on the grid, flattened over cells: ``offset`` / ``sqrt_size`` ``[N, M, B, d]``,
        ``conf`` ``[N, M, B]``, ``probs`` ``[N, M, K]``, decoded ``boxes`` ``[N, M, B, 2d]``, ``cells`` ``[M, d]``
        (integer cell coordinates) and ``grid`` (tuple of S_a). Sizes are fractions of ``image_shape`` (the input)."""
        d, nb = self.ndim, self.boxes_per_cell
        x = self.pred(self.tower(feats[self.level]))  # [N, B * (2d + 1) + K, *S]
        n, grid = x.shape[0], tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2).float()  # [N, M, B * (2d + 1) + K]
        m = x.shape[1]
        box = x[..., : nb * (2 * d + 1)].reshape(n, m, nb, 2 * d + 1).sigmoid()  # [N, M, B, 2d + 1]
        offset, sqrt_size, conf = box[..., :d], box[..., d : 2 * d], box[..., 2 * d]
        probs = x[..., nb * (2 * d + 1) :].softmax(-1)  # [N, M, K]
        axes = [torch.arange(s, device=x.device, dtype=x.dtype) for s in grid]
        cells = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(m, d)  # [M, d] row-major like flatten
        stride = torch.tensor(self.stride, dtype=x.dtype, device=x.device)  # [d]
        extent = torch.tensor([float(s) for s in image_shape], dtype=x.dtype, device=x.device)  # [d]
        centre = (cells[None, :, None, :] + offset) * stride  # [N, M, B, d]
        half = sqrt_size.square() * extent / 2  # [N, M, B, d]
        boxes = torch.cat([centre - half, centre + half], -1)  # [N, M, B, 2d]
        return {"offset": offset, "sqrt_size": sqrt_size, "conf": conf, "probs": probs, "boxes": boxes,
                "cells": cells, "grid": grid}

    def forward(self, feats, image_shape, targets=None, with_detections: bool = True):
        out = self.outputs(feats, image_shape)
        losses = self._losses(out, image_shape, targets) if targets is not None else {}
        dets = self._postprocess(out, image_shape) if with_detections else []
        return dets, losses

    # ------------------------------------------------------------------------------------------- loss
    def assign(self, out: dict, targets: list[dict[str, torch.Tensor]], image_shape: Sequence[int]) -> dict[str, torch.Tensor]:
        """Responsible cells and predictors for the ground truth of every image, batched over images and boxes.

        Returns ``image``, ``cell``, ``box`` (responsible predictor) and ``gt`` index of each ASSIGNED object (one per
        cell, the first listed; long ``[A]``), plus the targets ``offset`` / ``sqrt_size`` ``[A, d]``, ``iou`` ``[A]``
        (IoU of the responsible prediction, detached) and ``labels`` ``[A]``."""
        d = self.ndim
        n, m = out["conf"].shape[:2]
        grid = out["grid"]
        dev = out["conf"].device
        gt = torch.cat([t["boxes"].reshape(-1, 2 * d) for t in targets]).to(dev, torch.float32)  # [G, 2d]
        labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(dev)  # [G]
        image = torch.cat([torch.full((t["boxes"].reshape(-1, 2 * d).shape[0],), i, dtype=torch.long, device=dev)
                           for i, t in enumerate(targets)])  # [G]
        stride = torch.tensor(self.stride, dtype=torch.float32, device=dev)  # [d]
        size = torch.tensor(grid, dtype=torch.long, device=dev)  # [d]
        centre = (gt[:, :d] + gt[:, d:]) / 2 / stride  # [G, d] in cell units
        cell_nd = torch.minimum(centre.floor().long().clamp(min=0), size - 1)  # [G, d]
        cell = torch.zeros_like(image)
        for a in range(d):  # row-major flat index over the d axes
            cell = cell * grid[a] + cell_nd[:, a]
        slot = image * m + cell  # [G] flat (image, cell)
        g = torch.arange(gt.shape[0], device=dev)
        first = torch.full((n * m,), gt.shape[0], dtype=torch.long, device=dev).scatter_reduce(0, slot, g, "amin")
        keep = (first[slot] == g).nonzero().squeeze(1)  # [A] the first object of each cell
        gt, labels, image, cell, cell_nd, centre = gt[keep], labels[keep], image[keep], cell[keep], cell_nd[keep], centre[keep]
        with torch.no_grad():
            iou = elementwise_iou(out["boxes"][image, cell], gt[:, None, :])  # [A, B]
        best_iou, box = iou.max(1)  # [A] the responsible predictor: highest IoU of the cell's B boxes
        extent = torch.tensor([float(s) for s in image_shape], device=dev)  # [d] input size
        return {"image": image, "cell": cell, "box": box, "gt": keep, "labels": labels, "iou": best_iou,
                "offset": centre - cell_nd, "sqrt_size": (box_sizes(gt).clamp(min=0) / extent).sqrt()}

    def _losses(self, out, image_shape, targets):
        if len(targets) != out["conf"].shape[0]:
            raise ValueError(f"targets must have one dict per image ({out['conf'].shape[0]}), got {len(targets)}")
        n = out["conf"].shape[0]
        a = self.assign(out, targets, image_shape)
        i, c, b = a["image"], a["cell"], a["box"]
        resp = torch.zeros_like(out["conf"], dtype=torch.bool)  # [N, M, B]
        resp[i, c, b] = True
        coord = (out["offset"][i, c, b] - a["offset"]).square().sum() + (out["sqrt_size"][i, c, b] - a["sqrt_size"]).square().sum()
        obj = (out["conf"][i, c, b] - a["iou"]).square().sum()
        noobj = out["conf"].masked_fill(resp, 0.0).square().sum()
        onehot = F.one_hot(a["labels"], self.num_classes).to(out["probs"].dtype)  # [A, K]
        cls = (out["probs"][i, c] - onehot).square().sum()
        return {"yolo_coord": self.lambda_coord * coord / n, "yolo_obj": obj / n,
                "yolo_noobj": self.lambda_noobj * noobj / n, "yolo_class": cls / n}

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def _postprocess(self, out, image_shape):
        d, k = self.ndim, self.num_classes
        n, m, nb = out["conf"].shape
        scores = (out["probs"][:, :, None, :] * out["conf"][..., None]).reshape(n, m * nb * k)  # [N, M * B * K]
        boxes = clip_boxes(out["boxes"].reshape(n, m * nb, 2 * d), image_shape)  # [N, M * B, 2d]
        labels = torch.arange(k, device=scores.device).repeat(m * nb)  # [M * B * K]
        dets = []
        for j in range(n):  # loop over images
            ok = (scores[j] > self.score_thresh).nonzero().squeeze(1)
            bx = boxes[j][ok // k]
            ok_size = (box_sizes(bx) >= 1e-2).all(-1)
            ok, bx = ok[ok_size], bx[ok_size]
            s, lab = scores[j][ok], labels[ok]
            keep = batched_nms(bx, s, lab, self.nms_thresh)[: self.detections_per_img]
            dets.append({"boxes": bx[keep], "scores": s[keep], "labels": lab[keep]})
        return dets

    def num_boxes(self, image_shape: Sequence[int]) -> int:
        """Boxes the head scores for an input of ``image_shape`` (grid cells x B; the paper: 7 x 7 x 2 = 98)."""
        return math.prod(math.ceil(int(s) / st) for s, st in zip(image_shape, self.stride)) * self.boxes_per_cell
