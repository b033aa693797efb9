"""One-stage RetinaNet-style head (Lin et al., ICCV 2017) on the same backbone and anchors, any d.

Shape key: B batch, N anchors over all levels, K classes, A anchors per location, d spatial dims.
Matching: IoU >= 0.5 positive, < 0.4 negative (the paper), plus each object's best anchor; classification by sigmoid
focal loss (alpha 0.25, gamma 2) over all non-ignored anchors normalised by the positives; smooth L1 box loss.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..anchors import AnchorGenerator
from ..boxes import BoxCoder, batched_nms, box_iou, box_sizes, clip_boxes
from ..layers.nd import conv, norm
from ..losses import sigmoid_focal_loss, smooth_l1_loss
from ..matching import match_by_iou
from .rpn import flatten_head_outputs

__all__ = ["RetinaHead", "RetinaNetHead"]

# Lin et al. 2017: the classifier bias starts at -log((1 - pi) / pi), pi = 0.01, so early training is not swamped by
# the loss of the (many) easy background anchors.
PRIOR_PROB = 0.01


class RetinaHead(nn.Module):
    def __init__(self, *, in_channels: int, num_anchors: int, num_classes: int, ndim: int, depth: int = 4, norm_kind: str = "group"):
        super().__init__()
        Conv = conv(ndim)

        def tower():
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [Conv(in_channels, in_channels, 3, padding=1), norm(norm_kind, ndim, in_channels), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls = Conv(in_channels, num_anchors * num_classes, 3, padding=1)
        self.reg = Conv(in_channels, num_anchors * 2 * ndim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        self.num_classes = num_classes
        self.ndim = ndim

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        k, d = self.num_classes, self.ndim
        logits = torch.cat([flatten_head_outputs(self.cls(self.cls_tower(f)), k) for f in feats], 1)  # [B, N, K]
        deltas = torch.cat([flatten_head_outputs(self.reg(self.reg_tower(f)), 2 * d) for f in feats], 1)  # [B, N, 2d]
        return logits, deltas


class RetinaNetHead(nn.Module):
    """Head + anchors + losses + postprocessing; plugs into :class:`~medetect.models.detector.Detector`."""

    def __init__(
        self,
        *,
        anchor_generator: AnchorGenerator,
        head: RetinaHead,
        box_coder: BoxCoder | None = None,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder or BoxCoder()
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.score_thresh, self.topk_candidates = score_thresh, topk_candidates
        self.nms_thresh, self.detections_per_img = nms_thresh, detections_per_img

    def forward(self, feats, image_shape, targets=None, with_detections: bool = True):
        logits, deltas = self.head(feats)
        anchors = torch.cat(self.anchor_generator(feats), 0)  # [N, 2d]
        losses = self._losses(logits, deltas, anchors, targets) if targets is not None else {}
        dets = self._postprocess(logits, deltas, anchors, image_shape) if with_detections else []
        return dets, losses

    def _losses(self, logits, deltas, anchors, targets):
        k = logits.shape[-1]
        matches = torch.stack(
            [match_by_iou(box_iou(t["boxes"], anchors), high=self.fg_iou_thresh, low=self.bg_iou_thresh) for t in targets]
        )  # [B, N]
        pos = matches >= 0
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        gt_boxes = torch.zeros(deltas.shape, dtype=torch.float32, device=deltas.device)
        for i, t in enumerate(targets):  # loop over images
            if t["boxes"].shape[0]:
                mi = matches[i].clamp(min=0)
                onehot[i] = nn.functional.one_hot(t["labels"][mi], k).float() * pos[i, :, None]
                gt_boxes[i] = t["boxes"][mi].float()
        valid = matches >= -1
        n = pos.sum().clamp(min=1)
        cls = sigmoid_focal_loss(logits[valid].float(), onehot[valid], alpha=self.focal_alpha, gamma=self.focal_gamma) / n
        reg_t = self.box_coder.encode(gt_boxes, anchors[None].expand_as(gt_boxes))
        box = smooth_l1_loss(deltas[pos].float(), reg_t[pos], beta=1.0 / 9, reduction="sum") / n
        return {"classification": cls, "box_regression": box}

    @torch.no_grad()
    def _postprocess(self, logits, deltas, anchors, image_shape):
        b, n, k = logits.shape
        d = anchors.shape[1] // 2
        scores = torch.sigmoid(logits.float()).reshape(b, -1)  # [B, N * K]
        top = scores.topk(min(self.topk_candidates, scores.shape[1]), dim=1)  # [B, T]
        anchor_idx, labels = top.indices // k, top.indices % k
        sel = deltas.float().gather(1, anchor_idx[..., None].expand(-1, -1, 2 * d))  # [B, T, 2d]
        boxes = clip_boxes(self.box_coder.decode(sel, anchors[anchor_idx]), image_shape)  # [B, T, 2d]
        out = []
        for i in range(b):  # loop over images
            s, bx, lab = top.values[i], boxes[i], labels[i]
            ok = ((s > self.score_thresh) & (box_sizes(bx) >= 1e-2).all(-1)).nonzero().squeeze(1)
            s, bx, lab = s[ok], bx[ok], lab[ok]
            keep = batched_nms(bx, s, lab, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": bx[keep], "scores": s[keep], "labels": lab[keep]})
        return out
