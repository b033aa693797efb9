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
    "box_centres",
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
    "fuse_views",
    "BoxCoder",
]

# Faster R-CNN (Ren et al. 2015) / detectron2: the predicted log size ratio is clamped to log(1000 / 16) so that exp()
# cannot overflow for a wild early prediction: no box may grow more than 1000/16 = 62.5x its anchor.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# Rows of the IoU matrix computed at once inside NMS, bounding peak memory to about this many elements per temporary.
_NMS_CHUNK_ELEMENTS = 1 << 20  # 1M: temporaries stay in cache on CPUs


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


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
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


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: IoU of bf16/fp16 boxes computed in their own dtype flips decisions within about 1%
    of a threshold (bf16 has 8 significant bits), so every overlap test here promotes, as :class:`BoxCoder` does."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, 2d] x [M, 2d] -> [N, M]``, in [0, 1]; a pair of empty boxes has IoU 0. Computed (and
    returned) in float32 at least, whatever the boxes' dtype."""
    d = check_boxes(a, "a", ndim=2)
    check_boxes(b, "b", ndim=2, d=d)
    _same_device(a=a, b=b)
    a, b = _compute(a), _compute(b)
    inter = _intersection(a[:, None, :], b[None, :, :], d)  # [N, M]
    return _iou_from(inter, box_area(a)[:, None], box_area(b)[None, :])


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) ``[N, M]`` in [-1, 1] (float32 at least)."""
    d = check_boxes(a, "a", ndim=2)
    check_boxes(b, "b", ndim=2, d=d)
    _same_device(a=a, b=b)
    a, b = _compute(a), _compute(b)
    return _giou(a[:, None, :], b[None, :, :], d)


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows ``[..., 2d] x [..., 2d] -> [...]`` (broadcasting; float32 at least)."""
    d = check_boxes(a, "a")
    check_boxes(b, "b", d=d)
    _same_device(a=a, b=b)
    a, b = _compute(a), _compute(b)
    return _iou_from(_intersection(a, b, d), box_area(a), box_area(b))


def elementwise_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of matching rows ``[..., 2d] x [..., 2d] -> [...]`` (float32 at least)."""
    d = check_boxes(a, "a")
    check_boxes(b, "b", d=d)
    _same_device(a=a, b=b)
    a, b = _compute(a), _compute(b)
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


def _sweep(boxes: torch.Tensor, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep along axis 0. IoU > t needs, on every axis, an overlap above ``t`` times each box's extent (IoU <=
    inter / vol(p) <= ov_k / len_p,k). So with boxes sorted by ``lo_0``, box p can only suppress or be suppressed by
    the boxes q > p with ``lo_0,q < hi_0,p - t * len_0,p``: a run of ``counts[p]`` boxes found by ``searchsorted``.
    Returns (spatial order, counts)."""
    d = boxes.shape[1] // 2
    lo, hi = boxes[:, 0].contiguous(), boxes[:, d].contiguous()
    order = torch.argsort(lo)
    lo_s, hi_s = lo[order], hi[order]
    # Loosened by 1e-5 (like the screen in _banded_edges) so float rounding never drops a pair the exact test keeps.
    reach = hi_s - max(iou_threshold, 0.0) * (1 - 1e-5) * (hi_s - lo_s)
    end = torch.searchsorted(lo_s, reach)  # first q with lo_q >= reach_p: IoU <= t from there on
    counts = (end - torch.arange(lo.shape[0], device=boxes.device) - 1).clamp(min=0)
    return order, counts


def _banded_edges(
    boxes: torch.Tensor, iou_threshold: float, labels: torch.Tensor | None, order: torch.Tensor,
    chunks: list[tuple[int, int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Suppression edges ``(src, dst)`` (rank indices, ``src < dst``) from the sweep band.

    In sweep order, box p is compared with its next boxes through zero-copy sliding-window views of each coordinate
    column (``as_strided``), so the work is ``N x width`` contiguous element-wise operations instead of ``N^2 / 2``.
    Rows go in ``chunks`` ``(p0, p1, w)`` (:func:`_band_chunks`), each as wide as its own widest band, which keeps the
    work near ``sum(counts)``. Entries past a row's own ``counts[p]`` are not masked: the screen and the exact test
    reject them anyway (a mask costs more than the few extra candidates), and padding boxes never pass the screen.
    """
    n, d = boxes.shape[0], boxes.shape[1] // 2
    width = max((w for _, _, w in chunks), default=0)
    bs = boxes[order]
    cols = []
    for k in range(2 * d):  # per-coordinate columns, padded so every window of ``width`` exists
        c = torch.zeros(n + width, dtype=boxes.dtype, device=boxes.device)
        c[:n] = bs[:, k]
        cols.append(c)
    feat = torch.cat([bs, box_area(bs)[:, None]], dim=1)  # [N, 2d + 1] in sweep order
    # The screen below is a necessary condition; loosened by 1e-5 so that float rounding can never make it stricter
    # than the final test, which alone decides.
    thr = max(iou_threshold, 0.0) * (1 - 1e-5)
    k = 1 if d > 1 else 0  # screening axis: the second one (the first is the sweep's)
    len_pad = cols[d + k] - cols[k]
    lab = None
    if labels is not None:
        lab = torch.full((n + width,), -1, dtype=labels.dtype, device=labels.device)
        lab[:n] = labels[order]
    srcs, dsts = [], []
    for p0, p1, w in chunks:  # a loop over row chunks, not over boxes
        if w == 0:
            continue

        def band(col: torch.Tensor, p0=p0, p1=p1, w=w) -> torch.Tensor:  # [p1 - p0, w] view: col[p + 1 + j]
            return col.as_strided((p1 - p0, w), (1, 1), p0 + 1)

        # Screen: IoU > t needs, on the screening axis, an overlap above t x the extent of each box.
        lo_p, hi_p = cols[k][p0:p1, None], cols[d + k][p0:p1, None]
        ov = torch.minimum(hi_p, band(cols[d + k]))
        ov -= torch.maximum(lo_p, band(cols[k]))  # in place: each [rows, w] temporary costs as much as the op
        lim = torch.maximum(len_pad[p0:p1, None], band(len_pad))
        lim *= thr
        cand = ov > lim
        if lab is not None:
            cand &= lab[p0:p1, None] == band(lab)
        flat = cand.reshape(-1).nonzero().squeeze(1)  # one index per surviving pair (cheaper than [m, 2] coordinates)
        p = torch.div(flat, w, rounding_mode="floor")
        q = flat - p * w + p + 1 + p0  # sweep indices of the surviving pairs: q = p + 1 + column
        p += p0
        fp, fq = feat.index_select(0, p), feat.index_select(0, q)  # one gather per side: [m, 2d + 1] (box, volume)
        inter = _intersection(fp, fq, d)
        union = fp[:, -1] + fq[:, -1] - inter
        hit = ((inter > iou_threshold * union) & (union > 0)).nonzero().squeeze(1)
        a, b = order.index_select(0, p.index_select(0, hit)), order.index_select(0, q.index_select(0, hit))
        srcs.append(torch.minimum(a, b))
        dsts.append(torch.maximum(a, b))
    if not srcs:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty
    return torch.cat(srcs), torch.cat(dsts)


def _band_rows(device: torch.device) -> int:
    """Rows per band chunk before merging (:func:`_band_chunks`): 128 on CPU (cache-sized temporaries); on GPUs
    fewer, larger launches."""
    return 128 if device.type == "cpu" else 2048


# A chunk's fixed cost (a dozen small tensor ops and their Python dispatch), in band elements: adjacent chunks merge
# while the elements the merge wastes (rows padded to the merged widest band) stay below this. Measured on the 2-core
# CPU: 5k 3D / 10k 2D clustered boxes run ~30 % faster than with fixed 128-row chunks, 50k boxes as fast.
_CHUNK_COST = 16384
_CHUNK_MAX = 1 << 17  # band elements of one chunk at most: its temporaries stay cache-sized


def _band_chunks(widths: list[int], rows: int, n: int) -> list[tuple[int, int, int]]:
    """Row chunks ``(p0, p1, width)`` of the band: consecutive ``rows``-row blocks (widest bands ``widths``) merged
    greedily while merging saves more fixed cost than it adds padded work. Host-side arithmetic on the block list
    only (one entry per ``rows`` boxes)."""
    chunks: list[tuple[int, int, int]] = []
    for i, w in enumerate(widths):
        p0, p1 = i * rows, min(n, (i + 1) * rows)
        if chunks:
            q0, q1, qw = chunks[-1]
            merged = (p1 - q0) * max(qw, w)
            if merged <= _CHUNK_MAX and merged - (q1 - q0) * qw - (p1 - p0) * w < _CHUNK_COST:
                chunks[-1] = (q0, p1, max(qw, w))
                continue
        chunks.append((p0, p1, w))
    return chunks


def _chunk_widths(counts: torch.Tensor, rows: int) -> list[int]:
    """The widest band of each chunk of ``rows`` consecutive sweep rows (one host read for all chunks)."""
    n = counts.shape[0]
    padded = torch.zeros(-(-n // rows) * rows, dtype=counts.dtype, device=counts.device)
    padded[:n] = counts
    return padded.view(-1, rows).amax(1).tolist()


def _greedy_keep(n: int, suppressed_by: "callable", device) -> torch.Tensor:
    """Exact greedy NMS: ``keep[j] = not any_{i ranked before j} (keep[i] and S[i, j])``.

    ``suppressed_by(keep)`` returns, per box, the number of kept boxes ranked before it that overlap it too much.
    Solved as the fixed point of ``K <- (suppressed_by(K) == 0)`` starting from all-kept. The greedy answer is the
    unique fixed point (induction on rank), and after round t every box whose suppression chain is at most t long is
    final, so the iteration converges in (longest chain + 1) rounds; on real detections that is a handful. Greedy NMS
    is inherently sequential (the lexicographically first maximal independent set is P-complete), so an exact answer
    needs data-dependent rounds: convergence is checked once per ``_ROUNDS`` rounds (one host sync), never per box.
    """
    keep = torch.ones(n, dtype=torch.bool, device=device)
    rounds = 0
    while True:
        for _ in range(_ROUNDS):
            prev, keep = keep, suppressed_by(keep) == 0
        if torch.equal(keep, prev):
            return keep
        rounds += _ROUNDS
        if rounds > n + _ROUNDS:  # impossible for a valid (strictly rank-ordered) suppression relation
            raise RuntimeError("NMS fixed point did not converge: the suppression relation is not rank-ordered")


_ROUNDS = 4
# When the sweep band is wider than this fraction of N, the dense upper triangle (N^2 / 2 pairs) is cheaper.
_DENSE_FRACTION = 0.5


def _keep_sorted(boxes: torch.Tensor, iou_threshold: float, labels: torch.Tensor | None) -> torch.Tensor:
    """Greedy keep mask for boxes already in rank order."""
    n = boxes.shape[0]
    order, counts = _sweep(boxes, iou_threshold)
    rows = _band_rows(boxes.device)
    widths = _chunk_widths(counts, rows)  # one host sync: the band widths size the work
    # The band costs about rows x (each chunk's widest band); the dense upper triangle n^2 / 2. Deciding on the total
    # (not the single widest band) keeps one huge box, or a threshold of 0, on the band path.
    if sum(widths) * rows > _DENSE_FRACTION * n * n or iou_threshold < 0:
        # Heavily overlapping along the sweep axis: the dense upper triangle is cheaper than a band nearly as wide.
        # (A negative threshold makes even disjoint boxes suppress each other, which the sweep's bound excludes.)
        src, dst = _suppression_matrix(boxes, iou_threshold, labels).nonzero().unbind(1)
    else:
        src, dst = _banded_edges(boxes, iou_threshold, labels, order, _band_chunks(widths, rows, n))

    def suppressed_by(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32, device=boxes.device).index_add_(0, dst, keep[src].to(torch.float32))

    return _greedy_keep(n, suppressed_by, boxes.device)


def _nms_ranked(boxes, scores, iou_threshold, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank order ``[N]``, keep mask in rank order ``[N]``) after checking the inputs."""
    check_boxes(boxes, ndim=2)
    n = boxes.shape[0]
    _check_1d(scores, "scores", n, "one score per box")
    if labels is not None:
        _check_1d(labels, "labels", n, "one label per box")
        _same_device(boxes=boxes, scores=scores, labels=labels)
    else:
        _same_device(boxes=boxes, scores=scores)
    # Rank: decreasing score; equal scores keep the lower index first (stable sort).
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = _compute(boxes)  # the overlap test in float32 at least (see _compute)
    if n == 0:
        return order, torch.zeros(0, dtype=torch.bool, device=boxes.device)
    return order, _keep_sorted(boxes[order], float(iou_threshold), None if labels is None else labels[order])


def nms_mask(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy NMS as a keep mask ``[N]`` over the input order (see :func:`nms`)."""
    order, keep_sorted = _nms_ranked(boxes, scores, iou_threshold, labels)
    mask = torch.zeros(order.shape[0], dtype=torch.bool, device=boxes.device)
    mask[order] = keep_sorted
    return mask


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Exact greedy non-maximum suppression for boxes ``[N, 2d]`` of any d.

    Boxes are ranked by decreasing score, equal scores ranking the lower index first; a box is dropped when its IoU
    with a kept, higher-ranked box is strictly greater than ``iou_threshold``. Returns the kept indices ``[K]``
    (int64) in rank order. Vectorised (no loop over boxes, see :func:`_greedy_keep`).
    """
    order, keep_sorted = _nms_ranked(boxes, scores, iou_threshold, None)
    return order[keep_sorted]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS applied independently per label (class, or image index): boxes of different labels never suppress.

    Returns kept indices ``[K]`` in decreasing score order (ties: lower index first).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape [N], got {type(labels).__name__}")
    order, keep_sorted = _nms_ranked(boxes, scores, iou_threshold, labels)
    return order[keep_sorted]


def fuse_views(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, views: torch.Tensor, num_views: int,
               iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse the detections of ``num_views`` views of one image (test-time augmentation, already mapped back to the
    image), any d. Clusters are those of per-label NMS: each box joins the kept box of its label it overlaps most
    (IoU > ``iou_threshold``; a kept box is its own cluster). A cluster's score is the mean over ALL views of the
    view's best score in it (a view without a box there adds 0, so a mark seen in one view of four keeps a quarter
    of its score); its box is the score-weighted mean of its members. Returns ``(boxes, scores, labels)`` in
    decreasing fused score. Vectorised: no loop over boxes."""
    check_boxes(boxes)
    n = boxes.shape[0]
    if n == 0:
        return boxes, scores, labels
    keep = batched_nms(boxes, scores, labels, iou_threshold)
    iou = box_iou(boxes, boxes[keep])  # [N, K]
    iou = torch.where(labels[:, None] == labels[keep][None, :], iou, torch.full_like(iou, -1.0))
    iou[keep, torch.arange(len(keep), device=boxes.device)] = 2.0  # a kept box is its own cluster
    best, cluster = iou.max(dim=1)
    member = best > iou_threshold
    cluster, v, sc, bx = cluster[member], views[member].long(), scores[member].float(), boxes[member].float()
    k = len(keep)
    per_view = torch.zeros(k * num_views, dtype=torch.float32, device=boxes.device)
    per_view = per_view.scatter_reduce(0, cluster * num_views + v, sc, reduce="amax", include_self=True)
    fused = per_view.view(k, num_views).sum(1) / num_views
    w = torch.zeros(k, dtype=torch.float32, device=boxes.device).index_add_(0, cluster, sc)
    wb = torch.zeros(k, bx.shape[1], dtype=torch.float32, device=boxes.device).index_add_(0, cluster, bx * sc[:, None])
    fused_boxes = torch.where(w[:, None] > 0, wb / w.clamp_min(1e-12)[:, None], boxes[keep].float())
    order = torch.argsort(fused, descending=True, stable=True)
    return fused_boxes[order].to(boxes.dtype), fused[order].to(scores.dtype), labels[keep][order]


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
