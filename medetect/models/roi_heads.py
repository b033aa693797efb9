"""Fast R-CNN RoI box head for any d (Girshick, ICCV 2015), fed by FPN levels (Lin et al. 2017).

Shape key
    R  RoIs in the batch    K  object classes (background is index 0 inside the head, not in the API)
    C  feature channels     O  RoI output size per axis     d  spatial dims

Each proposal is pooled (RoIAlign, or the Fast R-CNN paper's RoI max pooling) from the pyramid level matched to its size (FPN Eq. 1, with the size of a d-box
taken as the geometric mean of its extents), passed through two fully connected layers, and classified (softmax over
K + 1) with a class-specific box regression (K x 2d deltas, weights (10, .., 5, ..) as in Fast R-CNN / detectron2).
API labels are 0..K-1; detections carry the same.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..boxes import BoxCoder, batched_nms, box_iou, box_sizes, clip_boxes
from ..layers.roi_align import roi_align, roi_pool
from ..losses import smooth_l1_loss
from ..matching import match_by_iou, sample_balanced

__all__ = ["MultiLevelRoIAlign", "TwoMLPHead", "FastRCNNPredictor", "RoIHeads", "ROI_POOL_MODES"]

# FPN Eq. 1: k = floor(k0 + log2(sqrt(wh) / 224)) with k0 = 4, the level of a 224 px (ImageNet-sized) RoI.
FPN_CANONICAL_SIZE = 224.0
FPN_CANONICAL_LEVEL = 4
# "align": RoIAlign (Mask R-CNN; bilinear samples, no rounding); "max": RoI max pooling (Fast R-CNN, Girshick 2015:
# corners rounded to the feature grid, the max of each bin).
ROI_POOL_MODES = ("align", "max")


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign (``mode="align"``) or RoI max pooling (``mode="max"``) from the pyramid level that matches each RoI's
    size."""

    def __init__(self, *, strides: Sequence[int | Sequence[int]], output_size: int | Sequence[int], sampling_ratio: int = 2,
                 mode: str = "align"):
        super().__init__()
        if mode not in ROI_POOL_MODES:
            raise ValueError(f"mode must be one of {ROI_POOL_MODES}, got {mode!r}")
        self.mode = mode
        # Per level, per-axis strides (anisotropic stems give e.g. (2, 4, 4)); the level index uses the largest.
        self.strides = [tuple(s) if isinstance(s, (tuple, list)) else (int(s),) for s in strides]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.levels = [int(round(math.log2(max(s)))) for s in self.strides]

    def forward(self, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        # rois [R, 1 + 2d] -> [R, C, *O]
        d = (rois.shape[1] - 1) // 2
        size = box_sizes(rois[:, 1:]).clamp(min=1e-6).log().mean(-1).exp()  # [R] geometric mean extent
        lvl = torch.floor(FPN_CANONICAL_LEVEL + torch.log2(size / FPN_CANONICAL_SIZE) + 1e-6)  # [R] pyramid level
        # [R] index into feats: the nearest level that exists (ties: the finer one), so that levels with gaps such as
        # [3, 5] lose no RoI; for consecutive levels this is ``clamp(lvl, first, last) - first``.
        have = torch.tensor(self.levels, dtype=lvl.dtype, device=lvl.device)  # [L]
        lvl = (lvl[:, None] - have[None, :]).abs().argmin(1)
        out_size = (self.output_size,) * d if isinstance(self.output_size, int) else tuple(self.output_size)
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1], *out_size), dtype=feats[0].dtype)
        for i, (f, s) in enumerate(zip(feats, self.strides)):  # loop over pyramid levels, not RoIs
            idx = (lvl == i).nonzero().squeeze(1)
            if idx.numel():
                scale = [1.0 / v for v in s] if len(s) > 1 else 1.0 / s[0]
                if self.mode == "max":  # the paper's boxes are inclusive pixel indices: half-open hi -> hi - 1
                    r = rois[idx]
                    r = torch.cat([r[:, : 1 + d], (r[:, 1 + d :] - 1).maximum(r[:, 1 : 1 + d])], 1)
                    pooled = roi_pool(f, r, out_size, spatial_scale=scale)
                else:
                    pooled = roi_align(f, rois[idx], out_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio)
                out[idx] = pooled.to(out.dtype)
        return out


class TwoMLPHead(nn.Module):
    def __init__(self, *, in_features: int, hidden: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [R, C * prod(O)]
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNPredictor(nn.Module):
    def __init__(self, *, in_features: int, num_classes: int, ndim: int):
        super().__init__()
        self.cls = nn.Linear(in_features, num_classes + 1)
        self.reg = nn.Linear(in_features, (num_classes + 1) * 2 * ndim)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(x), self.reg(x)


class RoIHeads(nn.Module):
    def __init__(
        self,
        *,
        roi_pool: MultiLevelRoIAlign,
        box_head: nn.Module,
        predictor: FastRCNNPredictor,
        num_classes: int,
        ndim: int,
        box_coder: BoxCoder | None = None,
        fg_iou_thresh: float = 0.5,  # Fast R-CNN: foreground RoIs have IoU >= 0.5
        bg_iou_thresh: float = 0.5,  # and background < 0.5
        batch_size_per_image: int = 512,  # Fast R-CNN: 128 per image with 2 images; torchvision 512
        positive_fraction: float = 0.25,  # Fast R-CNN: 25% foreground
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        self.roi_pool = roi_pool
        self.box_head = box_head
        self.predictor = predictor
        self.num_classes = num_classes
        self.ndim = ndim
        # Fast R-CNN regression targets are scaled by 10 (centre) and 5 (size) so that they have unit-ish variance.
        self.box_coder = box_coder or BoxCoder(weights=(10.0,) * ndim + (5.0,) * ndim)
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @staticmethod
    def _rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        idx = torch.cat([torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
        return torch.cat([idx, torch.cat(list(boxes))], dim=1)  # [R, 1 + 2d]

    def _predict(self, feats, boxes):
        rois = self._rois(boxes)
        x = self.box_head(self.roi_pool(feats, rois))
        return self.predictor(x)

    def forward(
        self,
        feats: Sequence[torch.Tensor],
        proposals: list[torch.Tensor],
        image_shape: Sequence[int],
        targets: list[dict[str, torch.Tensor]] | None = None,
        with_detections: bool = True,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        losses: dict[str, torch.Tensor] = {}
        if targets is not None:
            losses = self._losses(feats, proposals, targets)
        detections: list[dict[str, torch.Tensor]] = []
        if with_detections:
            with torch.no_grad():
                logits, deltas = self._predict(feats, proposals)
                detections = self._postprocess(logits, deltas, proposals, image_shape)
        return detections, losses

    def _losses(self, feats, proposals, targets) -> dict[str, torch.Tensor]:
        d = self.ndim
        sampled_boxes, cls_t, reg_t = [], [], []
        for p, t in zip(proposals, targets):  # loop over images
            gt, lab = t["boxes"].to(p.dtype), t["labels"]
            cand = torch.cat([p.detach(), gt])  # ground truth joins the proposals (torchvision, detectron2)
            m = match_by_iou(box_iou(gt, cand), high=self.fg_iou_thresh, low=self.bg_iou_thresh, allow_low_quality=False)
            pos, neg = sample_balanced(m, batch_size_per_image=self.batch_size_per_image, positive_fraction=self.positive_fraction)
            sel = (pos | neg).nonzero().squeeze(1)
            ms = m[sel]
            b = cand[sel]
            matched_gt = gt[ms.clamp(min=0)] if gt.shape[0] else torch.zeros_like(b)
            cls_t.append(torch.where(ms >= 0, lab[ms.clamp(min=0)] + 1 if gt.shape[0] else ms.clamp(min=0), torch.zeros_like(ms)))
            reg_t.append(self.box_coder.encode(matched_gt, b) if gt.shape[0] else torch.zeros_like(b))
            sampled_boxes.append(b)
        logits, deltas = self._predict(feats, sampled_boxes)
        cls_t, reg_t = torch.cat(cls_t), torch.cat(reg_t)
        cls_loss = F.cross_entropy(logits.float(), cls_t)
        fg = (cls_t > 0).nonzero().squeeze(1)
        deltas = deltas.view(deltas.shape[0], -1, 2 * d)  # [R, K + 1, 2d]
        box_loss = smooth_l1_loss(deltas[fg, cls_t[fg]].float(), reg_t[fg], beta=1.0 / 9, reduction="sum") / max(1, cls_t.numel())
        return {"roi_classifier": cls_loss, "roi_box": box_loss}

    def _postprocess(self, logits, deltas, proposals, image_shape) -> list[dict[str, torch.Tensor]]:
        d, k = self.ndim, self.num_classes
        probs = F.softmax(logits.float(), -1)[:, 1:]  # [R, K]
        deltas = deltas.float().view(deltas.shape[0], k + 1, 2 * d)[:, 1:]  # [R, K, 2d]
        props = torch.cat(proposals).float()
        boxes = clip_boxes(self.box_coder.decode(deltas, props[:, None, :]), image_shape)  # [R, K, 2d]
        out = []
        start = 0
        for p in proposals:  # loop over images
            n = p.shape[0]
            b = boxes[start : start + n].reshape(-1, 2 * d)  # [n * K, 2d]
            s = probs[start : start + n].reshape(-1)
            lab = torch.arange(k, device=b.device).repeat(n)
            start += n
            ok = ((s > self.score_thresh) & (box_sizes(b) >= 1e-2).all(-1)).nonzero().squeeze(1)
            b, s, lab = b[ok], s[ok], lab[ok]
            keep = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return out
