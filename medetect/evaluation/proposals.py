"""Proposal recall: the fraction of ground-truth objects that the top-n proposals of their image cover at IoU >= t,
for several n and t (Hosang et al., TPAMI 2016; the recall-vs-proposals curves of the selective search and RPN
papers). Any number d of spatial dims.

For one image, ``best[g, n - 1] = max_{j < n} IoU(gt_g, proposal_j)`` is the cumulative max along the proposals'
rank order of the ``[G, N]`` IoU matrix, so every n is read from one matrix (no loop over n or boxes). An image with
fewer than n proposals uses all it has; an image with none covers nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..boxes import box_iou

__all__ = ["proposal_recall"]


def proposal_recall(proposals: Sequence[torch.Tensor], gt: Sequence[torch.Tensor], counts: Sequence[int],
                    iou_thresholds: Sequence[float] = (0.5, 0.7)) -> dict:
    """Recall of the ground-truth boxes ``gt[i] [G_i, 2d]`` by the first n of ``proposals[i] [N_i, 2d]`` (rank
    order) for each n in ``counts``, at each IoU threshold (a hit: IoU >= t).

    Returns ``{"counts": [...], "iou_thresholds": [...], "recall": {"0.5": [per count], ...}, "num_gt": int,
    "num_images": int, "mean_proposals": [per count: mean over images of min(n, N_i)], "best_iou_mean": [per
    count: mean over objects of their best IoU]}``. ``num_gt == 0`` gives recalls of ``nan``."""
    if len(proposals) != len(gt):
        raise ValueError(f"proposals and gt must have one entry per image, got {len(proposals)} and {len(gt)}")
    cnt = [int(n) for n in counts]
    if not cnt or any(n < 1 for n in cnt):
        raise ValueError(f"counts must be positive integers, got {list(counts)}")
    thr = [float(t) for t in iou_thresholds]
    if not thr or any(not 0.0 <= t <= 1.0 for t in thr):
        raise ValueError(f"iou_thresholds must lie in [0, 1], got {list(iou_thresholds)}")
    c = torch.as_tensor(cnt)  # [C]
    t = torch.as_tensor(thr, dtype=torch.float64)  # [T]
    hits = torch.zeros(len(thr), len(cnt), dtype=torch.float64)  # [T, C]
    iou_sum = torch.zeros(len(cnt), dtype=torch.float64)  # [C]
    used = torch.zeros(len(cnt), dtype=torch.float64)  # [C]
    num_gt = 0
    for i, (p, g) in enumerate(zip(proposals, gt)):  # loop over images
        g = torch.as_tensor(g).double()
        g = g.reshape(-1, g.shape[-1])
        p = torch.as_tensor(p).double()
        p = p.reshape(-1, p.shape[-1]) if p.numel() else p.reshape(0, g.shape[-1])
        if p.shape[-1] != g.shape[-1]:
            raise ValueError(f"image {i}: proposals are [N, {p.shape[-1]}] but gt boxes [G, {g.shape[-1]}]")
        n_p = p.shape[0]
        used += c.clamp(max=n_p).double()
        if g.shape[0] == 0:
            continue
        num_gt += g.shape[0]
        if n_p == 0:
            continue
        m = int(c.max().clamp(max=n_p))
        best = box_iou(g, p[:m]).cummax(dim=1).values  # [G, m]: best IoU of each object among the top-n proposals
        at = best[:, (c.clamp(max=m) - 1)]  # [G, C]
        hits += (at[None] >= t[:, None, None]).sum(1).double()  # [T, C]
        iou_sum += at.sum(0)
    n_img = max(1, len(gt))
    recall = hits / num_gt if num_gt else torch.full_like(hits, float("nan"))
    return {
        "counts": cnt,
        "iou_thresholds": thr,
        "recall": {f"{v:g}": recall[k].tolist() for k, v in enumerate(thr)},
        "num_gt": num_gt,
        "num_images": len(gt),
        "mean_proposals": (used / n_img).tolist(),
        "best_iou_mean": (iou_sum / num_gt).tolist() if num_gt else [float("nan")] * len(cnt),
    }
