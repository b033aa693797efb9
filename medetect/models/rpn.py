"""Region Proposal Network (Ren et al., NeurIPS 2015) for any d, and its 3D form with focal loss (Xu et al., TMI 2019).

Shape key
    B  images in the batch          A  anchors per location        d  spatial dims
    L  feature locations of a level N  anchors over all levels     G  ground-truth boxes of one image
    P  proposals of one image

The RPN slides a 3^d window over each pyramid level (a 3^d conv), and predicts per location A objectness logits and
A x 2d box deltas relative to the anchors. Proposals: top-k per level, decode, clip, drop tiny boxes, NMS per level,
then the best ``post_nms_top_n`` per image.

Loss (the paper's Eq. 1): ``1/N_cls sum L_cls + lambda 1/N_reg sum p* L_reg``. The paper uses N_cls = 256 (the sampled
minibatch), N_reg ~ 2400 (anchor locations) and lambda = 10, which it notes is about the same as normalising both
terms by the minibatch size with lambda = 1; we do the latter (as detectron2 and torchvision do). With
``objectness_loss="focal"`` all non-ignored anchors enter a sigmoid focal loss normalised by the number of positives
(the 3D RPN for organ localisation in CT, where the foreground is a tiny fraction of a volume). With
``negative_sampling="hard"`` the sampled negatives are the highest-loss ones (hard negative mining) instead of random.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..anchors import AnchorGenerator
from ..boxes import BoxCoder, box_iou, clip_boxes, nms, remove_small_boxes
from ..layers.nd import conv
from ..losses import sigmoid_focal_loss, smooth_l1_loss
from ..matching import NEGATIVE, hard_negative_mining, match_by_iou, sample_balanced

__all__ = ["RPNHead", "RegionProposalNetwork", "flatten_head_outputs"]


class RPNHead(nn.Module):
    """3^d conv + ReLU, then 1^d convs to A objectness logits and A*2d deltas, shared across levels."""

    def __init__(self, *, in_channels: int, num_anchors: int, ndim: int):
        super().__init__()
        Conv = conv(ndim)
        self.ndim = ndim
        self.conv = Conv(in_channels, in_channels, 3, padding=1)
        self.cls = Conv(in_channels, num_anchors, 1)
        self.reg = Conv(in_channels, num_anchors * 2 * ndim, 1)
        for layer in (self.conv, self.cls, self.reg):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for f in feats:
            h = F.relu(self.conv(f))
            logits.append(self.cls(h))
            deltas.append(self.reg(h))
        return logits, deltas


def flatten_head_outputs(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, A * k, *S] -> [B, prod(S) * A, k]`` in the anchor order of :class:`AnchorGenerator`."""
    b, ak = x.shape[:2]
    a = ak // k
    x = x.view(b, a, k, -1)  # [B, A, k, L]
    return x.permute(0, 3, 1, 2).reshape(b, -1, k)  # [B, L * A, k]


class RegionProposalNetwork(nn.Module):
    def __init__(
        self,
        *,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        box_coder: BoxCoder | None = None,
        pre_nms_top_n: tuple[int, int] = (2000, 1000),  # (train, test) per level, as torchvision's FPN setting
        post_nms_top_n: tuple[int, int] = (2000, 1000),  # (train, test) per image
        nms_thresh: float = 0.7,  # the paper's proposal NMS threshold
        min_size: float = 1e-3,
        fg_iou_thresh: float = 0.7,  # paper: positive >= 0.7
        bg_iou_thresh: float = 0.3,  # paper: negative < 0.3
        batch_size_per_image: int = 256,  # paper: N_cls = 256 anchors per image
        positive_fraction: float = 0.5,  # paper: up to 1:1
        objectness_loss: str = "bce",  # "bce" (paper, sampled) or "focal" (all anchors)
        negative_sampling: str = "random",  # "random" (paper) or "hard": the highest-loss negatives (OHEM-style)
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if objectness_loss not in ("bce", "focal"):
            raise ValueError(f"objectness_loss must be 'bce' or 'focal', got {objectness_loss!r}")
        if negative_sampling not in ("random", "hard"):
            raise ValueError(f"negative_sampling must be 'random' or 'hard', got {negative_sampling!r}")
        self.negative_sampling = negative_sampling
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder or BoxCoder()
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.objectness_loss = objectness_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self,
        feats: Sequence[torch.Tensor],
        image_shape: Sequence[int],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        d = self.head.ndim
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(feats)  # per level [L * A, 2d]
        obj = [flatten_head_outputs(x, 1).squeeze(-1) for x in logits]  # per level [B, L * A]
        reg = [flatten_head_outputs(x, 2 * d) for x in deltas]  # per level [B, L * A, 2d]
        proposals = self._proposals(obj, reg, anchors, image_shape)
        losses: dict[str, torch.Tensor] = {}
        if targets is not None:
            losses = self._losses(torch.cat(obj, 1), torch.cat(reg, 1), torch.cat(anchors, 0), targets)
        return proposals, losses

    @torch.no_grad()
    def _proposals(self, obj, reg, anchors, image_shape) -> list[torch.Tensor]:
        train = 1 if not self.training else 0
        pre, post = self.pre_nms_top_n[train], self.post_nms_top_n[train]
        b = obj[0].shape[0]
        boxes_l, scores_l = [], []
        for o, r, a in zip(obj, reg, anchors):  # loop over pyramid levels
            k = min(pre, o.shape[1])
            top = o.topk(k, dim=1).indices  # [B, k]
            sel_r = r.gather(1, top[..., None].expand(-1, -1, r.shape[-1]))  # [B, k, 2d]
            bx = clip_boxes(self.box_coder.decode(sel_r.float(), a[top]), image_shape)  # [B, k, 2d]
            boxes_l.append(bx)
            scores_l.append(o.gather(1, top).float())
        out = []
        for i in range(b):  # loop over images (a handful), then over levels: NMS never mixes them
            kept_boxes, kept_scores = [], []
            for bx, sc in zip(boxes_l, scores_l):
                bi, si = bx[i], sc[i]
                ok = remove_small_boxes(bi, self.min_size)
                bi, si = bi[ok], si[ok]
                keep = nms(bi, si, self.nms_thresh)
                kept_boxes.append(bi[keep])
                kept_scores.append(si[keep])
            bi, si = torch.cat(kept_boxes), torch.cat(kept_scores)
            top = si.topk(min(post, si.shape[0])).indices
            out.append(bi[top])
        return out

    def _losses(self, obj, reg, anchors, targets) -> dict[str, torch.Tensor]:
        # obj [B, N], reg [B, N, 2d], anchors [N, 2d]
        matches = torch.stack(
            [
                match_by_iou(box_iou(t["boxes"], anchors), high=self.fg_iou_thresh, low=self.bg_iou_thresh)
                for t in targets
            ]
        )  # [B, N]
        gt_boxes = torch.stack(
            [t["boxes"][m.clamp(min=0)] if t["boxes"].shape[0] else torch.zeros_like(anchors) for t, m in zip(targets, matches)]
        )  # [B, N, 2d]
        pos = matches >= 0
        reg_t = self.box_coder.encode(gt_boxes, anchors[None].expand_as(gt_boxes))  # [B, N, 2d]
        labels = pos.to(obj.dtype)
        if self.objectness_loss == "bce":
            pos_s, neg_s = sample_balanced(
                matches, batch_size_per_image=self.batch_size_per_image, positive_fraction=self.positive_fraction
            )
            if self.negative_sampling == "hard":
                # Hard negative mining: fill the minibatch with the negatives the network gets most wrong (the
                # vessels that look like nodules in CT) instead of random ones.
                with torch.no_grad():
                    per_anchor = F.binary_cross_entropy_with_logits(obj.float(), labels, reduction="none")  # [B, N]
                num_neg = (self.batch_size_per_image - pos_s.sum(-1)).clamp(min=0)  # [B]
                neg_s = hard_negative_mining(per_anchor, matches == NEGATIVE, num_neg)
            sampled = pos_s | neg_s
            n = sampled.sum().clamp(min=1)
            cls = F.binary_cross_entropy_with_logits(obj[sampled], labels[sampled], reduction="sum") / n
            box = smooth_l1_loss(reg[pos_s].float(), reg_t[pos_s], beta=1.0 / 9, reduction="sum") / n
        else:
            valid = matches >= -1  # everything but the ignored band
            n = pos.sum().clamp(min=1)
            cls = sigmoid_focal_loss(obj[valid].float(), labels[valid], alpha=self.focal_alpha, gamma=self.focal_gamma) / n
            box = smooth_l1_loss(reg[pos].float(), reg_t[pos], beta=1.0 / 9, reduction="sum") / n
        return {"rpn_objectness": cls, "rpn_box": box}
