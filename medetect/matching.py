"""Matching anchors/proposals to ground truth, and sampling them: pure functions, any d, no host syncs.

Shape key
    G  ground-truth boxes of one image
    N  anchors (or proposals)

A match is a LongTensor ``[N]``: the index of the matched ground truth, or ``NEGATIVE`` (-1, background) or
``IGNORE`` (-2, neither: excluded from the loss).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .boxes import box_centres, box_iou, check_boxes

__all__ = [
    "NEGATIVE",
    "IGNORE",
    "match_by_iou",
    "match_atss",
    "sample_balanced",
    "hard_negative_mining",
]

NEGATIVE = -1
IGNORE = -2


def match_by_iou(
    iou: torch.Tensor,
    *,
    high: float = 0.7,
    low: float = 0.3,
    allow_low_quality: bool = True,
) -> torch.Tensor:
    """Faster R-CNN matching rules for an IoU matrix ``[G, N]`` (ground truth x anchors) -> ``[N]``.

    Ren et al. 2015, Sec. 3.1.2: an anchor is positive when its IoU with some ground truth is >= ``high`` (0.7),
    negative when its IoU with every ground truth is < ``low`` (0.3), ignored in between; and each ground truth's
    best anchor(s) (all anchors tying for its maximum IoU, as detectron2 does) are positive too so that no object is
    left without an anchor (``allow_low_quality``). For the Fast R-CNN RoI head use ``high=low=0.5``.
    """
    if not isinstance(iou, torch.Tensor) or iou.ndim != 2:
        raise ValueError(f"iou must be a [G, N] tensor (ground truth x anchors), got {getattr(iou, 'shape', type(iou))}")
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    g, n = iou.shape
    if g == 0 or n == 0:  # no ground truth, or no anchors (max over an empty dim would raise)
        return torch.full((n,), NEGATIVE, dtype=torch.long, device=iou.device)
    best_iou, best_gt = iou.max(dim=0)  # [N]
    matches = best_gt.clone()
    matches[best_iou < high] = IGNORE
    matches[best_iou < low] = NEGATIVE
    if allow_low_quality:
        gt_best = iou.max(dim=1, keepdim=True).values  # [G, 1]
        # Anchors tying for a ground truth's best IoU (and overlapping it at all) become positive.
        is_best = (iou == gt_best) & (gt_best > 0)  # [G, N]
        has = is_best.any(dim=0)  # [N]
        matches = torch.where(has, best_gt, matches)
    return matches


def match_atss(
    anchors_per_level: Sequence[torch.Tensor],
    gt: torch.Tensor,
    *,
    topk: int = 9,
) -> torch.Tensor:
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020) for any d -> matches ``[N]`` (N = all levels).

    For each ground truth: on every level take the ``topk`` anchors whose centres are closest to its centre; their
    IoUs give a threshold mean + std; candidates with IoU >= threshold whose centre lies inside the ground truth are
    positive. An anchor positive for several ground truths goes to the one of highest IoU. Everything else is negative.
    """
    d = check_boxes(gt, "gt", ndim=2)
    for i, a in enumerate(anchors_per_level):
        check_boxes(a, f"anchors_per_level[{i}]", ndim=2, d=d)
    anchors = torch.cat(list(anchors_per_level), dim=0)  # [N, 2d]
    n = anchors.shape[0]
    if gt.shape[0] == 0 or n == 0:
        return torch.full((n,), NEGATIVE, dtype=torch.long, device=anchors.device)
    iou = box_iou(gt, anchors)  # [G, N]
    gc, ac = box_centres(gt), box_centres(anchors)  # [G, d], [N, d]
    dist = torch.cdist(gc, ac)  # [G, N]
    cand = []
    start = 0
    for a in anchors_per_level:  # loop over pyramid levels (a handful), not boxes
        k = min(topk, a.shape[0])
        if k > 0:
            cand.append(dist[:, start : start + a.shape[0]].topk(k, dim=1, largest=False).indices + start)  # [G, k]
        start += a.shape[0]
    cand_idx = torch.cat(cand, dim=1)  # [G, K]
    cand_iou = iou.gather(1, cand_idx)  # [G, K]
    # One candidate in all (topk=1, one level): its std is 0 (torch would warn and return NaN).
    std = cand_iou.std(dim=1, keepdim=True) if cand_iou.shape[1] > 1 else torch.zeros_like(cand_iou)
    thr = cand_iou.mean(dim=1, keepdim=True) + std
    inside = ((ac[cand_idx] > gt[:, None, :d]) & (ac[cand_idx] < gt[:, None, d:])).all(dim=-1)  # [G, K]
    pos = (cand_iou >= thr) & inside  # [G, K]
    # Scatter candidate positives into a [G, N] IoU table (others -1) and take the best ground truth per anchor.
    table = torch.full_like(iou, -1.0)
    table.scatter_(1, cand_idx, torch.where(pos, cand_iou, torch.full_like(cand_iou, -1.0)))
    best, best_gt = table.max(dim=0)  # [N]
    return torch.where(best >= 0, best_gt, torch.full_like(best_gt, NEGATIVE))


def _random_rank(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random rank (0, 1, ...) of each True entry of ``mask [..., N]`` along the last dim; False entries rank last."""
    keys = torch.rand(mask.shape, device=mask.device, generator=generator)
    keys = torch.where(mask, keys, torch.full_like(keys, 2.0))
    order = keys.argsort(dim=-1)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(mask.shape[-1], device=mask.device).expand_as(order).contiguous())
    return rank


def sample_balanced(
    matches: torch.Tensor,
    *,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive/negative minibatch per image (Ren et al. 2015: 256 anchors, up to 1:1), no host sync.

    ``matches [..., N]`` (>= 0 positive, ``NEGATIVE`` negative, ``IGNORE`` ignored). Returns boolean masks
    ``(positive, negative)`` of the same shape: at most ``batch_size_per_image * positive_fraction`` positives, and
    negatives filling the rest of the minibatch.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    pos, neg = matches >= 0, matches == NEGATIVE
    num_pos = pos.sum(-1, keepdim=True).clamp(max=int(batch_size_per_image * positive_fraction))
    num_neg = (batch_size_per_image - num_pos).clamp(min=0)
    pos_sel = pos & (_random_rank(pos, generator) < num_pos)
    neg_sel = neg & (_random_rank(neg, generator) < num_neg)
    return pos_sel, neg_sel


def hard_negative_mining(
    loss: torch.Tensor, negative: torch.Tensor, num_negative: torch.Tensor | int
) -> torch.Tensor:
    """Keep the ``num_negative`` highest-loss negatives (per row of ``[..., N]``); returns a boolean mask.

    ``num_negative`` may be a tensor (e.g. 3x the positives per image, as in SSD) so that no host sync is needed.
    """
    if loss.shape != negative.shape:
        raise ValueError(f"loss {tuple(loss.shape)} and negative {tuple(negative.shape)} must have the same shape")
    keys = torch.where(negative, loss.detach(), torch.full_like(loss, -torch.inf, dtype=loss.dtype))
    order = keys.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(loss.shape[-1], device=loss.device).expand_as(order).contiguous())
    if isinstance(num_negative, torch.Tensor) and num_negative.ndim == loss.ndim - 1:
        num_negative = num_negative[..., None]
    return negative & (rank < num_negative)
