"""Box operations for any number of spatial dimensions.

Shape key
    N, M  number of boxes
    d     spatial dims; a box is ``[2d]`` = ``(lo_1..lo_d, hi_1..hi_d)``, array-axis order, half-open, voxel units

Every function slices the first and last ``d`` columns; none branches on ``d``. Value checks that would need a host
sync (NaN, inverted boxes) are not done here: readers and datasets check data where it enters.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "box_area",
    "box_centers",
    "box_sizes",
    "box_iou",
    "generalized_box_iou",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "clip_boxes",
    "remove_small_boxes",
    "nms",
    "batched_nms",
    "nms_mask",
    "BoxCoder",
]

# Faster R-CNN (Ren et al. 2015) / detectron2: the predicted log size ratio is clamped to log(1000 / 16) so that exp()
# cannot overflow for a wild early prediction: no box may grow more than 1000/16 = 62.5x its anchor.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# Rows of the IoU matrix computed at once inside NMS, bounding peak memory to about this many elements per temporary.
_NMS_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------- input checks


def check_boxes(boxes: torch.Tensor, name: str = "boxes", ndim: int | None = None, d: int | None = None) -> int:
    """Validate a box tensor's type and shape (no value checks: those would sync). Returns d."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., 2d], got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [..., 2d], got dtype {boxes.dtype}")
    if boxes.ndim == 0 or boxes.shape[-1] == 0 or boxes.shape[-1] % 2:
        raise ValueError(f"{name} must have shape [..., 2d] (lo_1..lo_d, hi_1..hi_d), got {tuple(boxes.shape)}")
    if ndim is not None and boxes.ndim != ndim:
        want = "[N, 2d]" if ndim == 2 else f"{ndim}-dimensional"
        raise ValueError(f"{name} must have shape {want}, got {tuple(boxes.shape)}")
    bd = boxes.shape[-1] // 2
    if d is not None and bd != d:
        raise ValueError(f"{name} must have last dimension {2 * d} (same d as the other boxes), got {tuple(boxes.shape)}")
    return bd


def _same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    dev0 = items[0][1].device
    for name, t in items[1:]:
        if t.device != dev0:
            raise ValueError(f"{name} is on {t.device} but {items[0][0]} is on {dev0}; put them on the same device")


def _check_1d(t: torch.Tensor, name: str, n: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{n}], got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] ({what}), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------- geometry


def box_sizes(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 2d] -> [..., d]`` extents ``hi - lo``."""
    d = check_boxes(boxes)
    return boxes[..., d:] - boxes[..., :d]


def box_centers(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 2d] -> [..., d]`` centres ``(lo + hi) / 2``."""
    d = check_boxes(boxes)
    return (boxes[..., d:] + boxes[..., :d]) * 0.5


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 2d] -> [...]`` area (2D) or volume (3D): the product of the extents, no +1 (half-open)."""
    return box_sizes(boxes).prod(dim=-1)


def _intersection(a: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
    """Broadcasting intersection volume of ``a [..., 2d]`` and ``b [..., 2d]``; one small loop over the d axes."""
    inter = None
    for k in range(d):
        ext = (torch.minimum(a[..., d + k], b[..., d + k]) - torch.maximum(a[..., k], b[..., k])).clamp_(min=0)
        inter = ext if inter is None else inter.mul_(ext)
    return inter


def _enclosing(a: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
    """Broadcasting volume of the smallest box enclosing ``a`` and ``b``."""
    enc = None
    for k in range(d):
        ext = torch.maximum(a[..., d + k], b[..., d + k]) - torch.minimum(a[..., k], b[..., k])
        enc = ext if enc is None else enc.mul_(ext)
    return enc


def _iou_from(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor) -> torch.Tensor:
    union = area_a + area_b - inter
    # 0/0 (two empty boxes) is defined as IoU 0: degenerate boxes overlap nothing.
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, 2d] x [M, 2d] -> [N, M]``, in [0, 1]; a pair of empty boxes has IoU 0."""
    d = check_boxes(a, "a", ndim=2)
    check_boxes(b, "b", ndim=2, d=d)
    _same_device(a=a, b=b)
    inter = _intersection(a[:, None, :], b[None, :, :], d)  # [N, M]
    return _iou_from(inter, box_area(a)[:, None], box_area(b)[None, :])


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) ``[N, M]`` in [-1, 1]."""
    d = check_boxes(a, "a", ndim=2)
    check_boxes(b, "b", ndim=2, d=d)
    _same_device(a=a, b=b)
    return _giou(a[:, None, :], b[None, :, :], d)


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows ``[..., 2d] x [..., 2d] -> [...]`` (broadcasting)."""
    d = check_boxes(a, "a")
    check_boxes(b, "b", d=d)
    _same_device(a=a, b=b)
    return _iou_from(_intersection(a, b, d), box_area(a), box_area(b))


def elementwise_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of matching rows ``[..., 2d] x [..., 2d] -> [...]``."""
    d = check_boxes(a, "a")
    check_boxes(b, "b", d=d)
    _same_device(a=a, b=b)
    return _giou(a, b, d)


def _giou(a: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
    inter = _intersection(a, b, d)
    area_a, area_b = box_area(a), box_area(b)
    union = area_a + area_b - inter
    iou = _iou_from(inter, area_a, area_b)
    enc = _enclosing(a, b, d)
    tiny = torch.finfo(enc.dtype).tiny
    penalty = torch.where(enc > 0, (enc - union) / enc.clamp(min=tiny), torch.zeros_like(enc))
    return iou - penalty


def clip_boxes(boxes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Clamp boxes ``[..., 2d]`` into the image ``[0, shape_k]`` on every axis (shape: spatial size, array order)."""
    d = check_boxes(boxes)
    if len(shape) != d:
        raise ValueError(f"shape must have {d} entries (spatial size in array-axis order) for boxes [..., {2 * d}], got {tuple(shape)}")
    hi = torch.as_tensor([float(s) for s in shape] * 2, dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), hi)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of the boxes ``[N, 2d]`` whose extent is >= ``min_size`` on every axis."""
    check_boxes(boxes, ndim=2)
    keep = (box_sizes(boxes) >= min_size).all(dim=-1)
    return keep.nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------- NMS


def _suppression_matrix(boxes: torch.Tensor, iou_threshold: float, labels: torch.Tensor | None) -> torch.Tensor:
    """``[N, N]`` bool: ``S[i, j]`` = box i (ranked before j) overlaps box j with IoU > threshold (and same label).

    ``boxes`` are already in rank order; only ``i < j`` is set. Computed in row chunks to bound memory.
    """
    n, d = boxes.shape[0], boxes.shape[1] // 2
    area = box_area(boxes)
    out = torch.zeros((n, n), dtype=torch.bool, device=boxes.device)
    chunk = max(1, _NMS_CHUNK_ELEMENTS // max(n, 1))
    idx = torch.arange(n, device=boxes.device)
    for start in range(0, n, chunk):  # a loop over memory chunks, not over boxes
        stop = min(n, start + chunk)
        # Only columns >= start can be ranked after rows [start, stop): the lower triangle stays False.
        inter = _intersection(boxes[start:stop, None, :], boxes[None, start:, :], d)  # [c, N - start]
        # IoU > t  <=>  inter > t * union (union > 0): no division, and empty boxes have IoU 0.
        union = area[start:stop, None] + area[None, start:] - inter
        s = (inter > iou_threshold * union) & (union > 0)
        s &= idx[None, start:] > idx[start:stop, None]
        if labels is not None:
            s &= labels[start:stop, None] == labels[None, start:]
        out[start:stop, start:] = s
    return out


def _greedy_keep(sup: torch.Tensor) -> torch.Tensor:
    """Exact greedy NMS on a rank-ordered suppression matrix: ``keep[j] = not any_i<j (keep[i] and S[i, j])``.

    Solved as the fixed point of ``K <- not (K @ S)`` starting from all-kept. The greedy answer is the unique fixed
    point (induction on rank), and after round t every box whose suppression chain is at most t long is final, so the
    iteration converges in (longest chain + 1) rounds; on real detections that is a handful. Greedy NMS is
    inherently sequential (the lexicographically first maximal independent set is P-complete), so an exact
    answer needs data-dependent rounds: we check convergence only once per ``_ROUNDS`` rounds, which keeps host
    synchronisations to about one per call for typical inputs and none per box.
    """
    n = sup.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=sup.device)
    # A float mat-vec counts, per column, the kept boxes that suppress it (exact: counts < 2**24).
    supf = sup.to(torch.float32)
    keep = torch.ones(n, dtype=torch.bool, device=sup.device)
    while True:
        for _ in range(_ROUNDS):
            prev, keep = keep, (keep.to(torch.float32) @ supf) == 0
        if torch.equal(keep, prev):  # the one host sync per _ROUNDS rounds
            return keep


_ROUNDS = 4


def nms_mask(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy NMS as a keep mask ``[N]`` over the input order (see :func:`nms`)."""
    check_boxes(boxes, ndim=2)
    n = boxes.shape[0]
    _check_1d(scores, "scores", n, "one score per box")
    if labels is not None:
        _check_1d(labels, "labels", n, "one label per box")
        _same_device(boxes=boxes, scores=scores, labels=labels)
    else:
        _same_device(boxes=boxes, scores=scores)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=boxes.device)
    # Rank: decreasing score; equal scores keep the lower index first (stable sort).
    order = torch.sort(scores, descending=True, stable=True).indices
    sup = _suppression_matrix(boxes[order], float(iou_threshold), None if labels is None else labels[order])
    keep_sorted = _greedy_keep(sup)
    mask = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    mask[order] = keep_sorted
    return mask


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Exact greedy non-maximum suppression for boxes ``[N, 2d]`` of any d.

    Boxes are ranked by decreasing score, equal scores ranking the lower index first; a box is dropped when its IoU
    with a kept, higher-ranked box is strictly greater than ``iou_threshold``. Returns the kept indices ``[K]``
    (int64) in rank order. Vectorised (no loop over boxes, see :func:`_greedy_keep`).
    """
    mask = nms_mask(boxes, scores, iou_threshold)
    if mask.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[mask[order]]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS applied independently per label (class, or image index): boxes of different labels never suppress.

    Returns kept indices ``[K]`` in decreasing score order (ties: lower index first).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape [N], got {type(labels).__name__}")
    mask = nms_mask(boxes, scores, iou_threshold, labels)
    if mask.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[mask[order]]


# ----------------------------------------------------------------------------------------------- box coding


class BoxCoder:
    """The Faster R-CNN box parameterisation (Girshick 2015, Ren et al. 2015) for any d.

    For anchor centre ``c_a``, size ``s_a`` and target centre ``c_g``, size ``s_g`` on each axis k::

        t_ck = w_ck * (c_gk - c_ak) / s_ak          t_sk = w_sk * log(s_gk / s_ak)

    ``weights`` is ``(w_c1..w_cd, w_s1..w_sd)`` (default all 1; torchvision's RoI heads use (10, 10, 5, 5)).
    ``decode`` clamps ``t_s / w_s`` to ``scale_clamp`` (log(1000/16)) before ``exp``. Inverse: ``decode(encode(g, a), a) == g``
    (up to float rounding). Computation is in float32 at least; outputs have the dtype of the input deltas / boxes.
    """

    def __init__(self, *, weights: Sequence[float] | None = None, scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        if self.weights is not None and (len(self.weights) == 0 or len(self.weights) % 2):
            raise ValueError(f"weights must have 2d entries (centre weights then size weights), got {self.weights}")
        self.scale_clamp = float(scale_clamp)

    def _w(self, d: int, ref: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return torch.ones(2 * d, dtype=ref.dtype, device=ref.device)
        if len(self.weights) != 2 * d:
            raise ValueError(f"BoxCoder weights have {len(self.weights)} entries but boxes are [..., {2 * d}]")
        return torch.as_tensor(self.weights, dtype=ref.dtype, device=ref.device)

    @staticmethod
    def _compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, torch.float32)

    def encode(self, gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Targets ``[..., 2d]`` of ground-truth boxes ``gt`` relative to ``anchors`` (broadcasting)."""
        d = check_boxes(gt, "gt")
        check_boxes(anchors, "anchors", d=d)
        _same_device(gt=gt, anchors=anchors)
        ct = self._compute_dtype(gt)
        g, a = gt.to(ct), anchors.to(ct)
        w = self._w(d, g)
        sa, sg = a[..., d:] - a[..., :d], g[..., d:] - g[..., :d]
        ca, cg = a[..., :d] + 0.5 * sa, g[..., :d] + 0.5 * sg
        tc = w[:d] * (cg - ca) / sa
        ts = w[d:] * torch.log(sg / sa)
        return torch.cat([tc, ts], dim=-1).to(gt.dtype)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 2d]`` from ``deltas`` relative to ``anchors`` (broadcasting; e.g. deltas ``[N, K, 2d]`` with
        anchors ``[N, 1, 2d]`` for per-class regression)."""
        d = check_boxes(deltas, "deltas")
        check_boxes(anchors, "anchors", d=d)
        _same_device(deltas=deltas, anchors=anchors)
        ct = self._compute_dtype(deltas)
        t, a = deltas.to(ct), anchors.to(ct)
        w = self._w(d, t)
        sa = a[..., d:] - a[..., :d]
        ca = a[..., :d] + 0.5 * sa
        c = ca + t[..., :d] / w[:d] * sa
        s = sa * torch.exp((t[..., d:] / w[d:]).clamp(max=self.scale_clamp))
        return torch.cat([c - 0.5 * s, c + 0.5 * s], dim=-1).to(deltas.dtype)
