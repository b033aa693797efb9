"""RoIAlign and RoIPool for 2D and 3D (any d) feature maps, vectorised over RoIs.

Both functions are written once for any number ``d`` of spatial dimensions, inferred from the feature map.
Their semantics are those of ``torchvision.ops.roi_align`` (Mask R-CNN RoIAlign) and
``torchvision.ops.roi_pool`` (Fast R-CNN RoI max pooling), extended from 2D to d dimensions; boxes follow the
library convention: ``(lo_1..lo_d, hi_1..hi_d)`` in array-axis order (2D ``(y0, x0, y1, x1)``, 3D
``(z0, y0, x0, z1, y1, x1)``), in input-image voxel units.

Shape key
---------
    B         batch images                C     channels
    d         number of spatial dims      N_a   feature map size along spatial axis a (N = prod N_a)
    K         number of RoIs              P_a   output size along axis a (P = prod P_a)
    Q = K*P   output bins                 G_a   samples per bin along axis a (RoIAlign)
    M = prod_a 2*G_a   (row, weight) pairs per bin in RoIAlign: G_a samples times 2 interpolation corners
    T_a       length of a sparse-table level along axis a (RoIPool): N_a - 2**j_a + 1

Method
------
RoIAlign. Bilinear (trilinear, ...) interpolation with torchvision's border rule is separable: a sample's
value is ``sum over corners of prod_a w_a(corner_a) * f[corner]``, and a sample outside ``[-1, N_a]`` on any
axis is zero, i.e. its weight on that axis is zero. For each axis we compute, for all RoIs at once, the
``G_a`` sample coordinates of every bin and their 2 corner indices and weights (``[K, P_a, 2*G_a]``); the
outer "sum" of the per-axis indices and "product" of the per-axis weights gives, for every output bin, ``M``
rows of the channels-last feature table ``[B*N, C]`` and their weights (``1/count`` folded in). The weighted
sum of those rows is done by ``torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)``, a
single fused gather-multiply-reduce kernel on CPU and CUDA: peak memory is the ``[Q, C]`` output plus the
``[Q, M]`` index and weight tensors (no ``Q*M*C`` intermediate), each gathered row is a contiguous C-vector,
and autograd to ``features`` goes through embedding_bag's backward (a scatter-add). No gradient flows to
``rois`` (as in torchvision).

Adaptive sampling (``sampling_ratio <= 0``) uses torchvision's per-RoI count ``ceil(roi_size_a / P_a)``.
It is exact: the grid is the per-axis maximum count over all RoIs, and samples beyond a RoI's own count
are masked out. Sizing that grid needs its maximum on the host, so this mode (and only this mode) makes one
host synchronisation, and its memory grows with the largest RoI. ``sampling_ratio > 0`` (default 2) is
fully sync-free.

RoIPool. Each bin is the max over a box-shaped window ``[s_a, e_a)`` of data-dependent size, so a fixed-size
gather cannot cover it. We use an exact d-dimensional sparse table (binary decomposition): a window of
length ``L_a`` along axis a is the disjoint union of blocks of length ``2**j`` for the set bits ``j`` of
``L_a``, the block for bit ``j`` starting at ``s_a + (L_a mod 2**j)``. The table for level tuple
``(j_1..j_d)`` holds, at every position, the max (and its argmax) over the block of size ``2**j_1 x .. x
2**j_d`` starting there; it is built from the previous level by one elementwise max of two shifted views.
We visit every level tuple (``prod_a bit_length(N_a)`` of them, a static number: 72 for a 200 x 272 map),
and every bin whose window uses that tuple takes one gathered C-vector from the table (bins that do not use
it gather a sentinel "minus infinity" row; no loop over RoIs, no host sync). Ties go to the smallest flat
index, i.e. the first element in raster order, exactly like torchvision's strict ``>`` scan; NaNs are
skipped like torchvision; the values are finally gathered from ``features`` at the argmax, so the gradient
goes to the argmax only. For float32/16/bf16 the (value, argmax) pair is packed into one int64 key (order-
preserving int32 image of the value in the high half, the complemented index in the low half), so a merge
is a single integer ``maximum``; float64 keeps a (value, index) pair. Memory: ``d + 1`` tables of the
feature map's size (int64 keys) alive at once; time: ``prod_a bit_length(N_a)`` passes over the map plus
as many gathers of ``[Q, C]`` -- independent of the RoI sizes, but a multiple of torchvision's direct scan
on large maps (RoIPool is kept for completeness; RoIAlign is the op the models use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]

# torchvision starts each RoIPool max at -FLT_MAX (for every dtype); a window whose values never exceed it
# (all NaN, all -inf) outputs -FLT_MAX with no gradient.
_NEG_FLT_MAX = -torch.finfo(torch.float32).max


def _output_size(output_size: int | Sequence[int], d: int) -> tuple[int, ...]:
    if isinstance(output_size, bool):
        raise ValueError(f"output_size must be an int or a tuple of {d} ints, got {output_size!r}")
    if isinstance(output_size, int):
        sizes: tuple = (output_size,) * d
    elif isinstance(output_size, Sequence) and not isinstance(output_size, str):
        sizes = tuple(output_size)
    else:
        raise ValueError(f"output_size must be an int or a tuple of {d} ints, got {output_size!r}")
    if len(sizes) != d or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(
            f"output_size must be a positive int or a tuple of {d} positive ints for a {d}-D feature map, "
            f"got {output_size!r}"
        )
    return sizes


def _check_inputs(
    features: Tensor, rois: Tensor, output_size: int | Sequence[int], fn: str
) -> tuple[int, tuple[int, ...]]:
    """Validate ``features [B, C, *spatial]`` and ``rois [K, 1 + 2d]``; return ``(d, output_size)``."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{fn}: features must be a Tensor [B, C, *spatial], got {type(features).__name__}")
    if not isinstance(rois, Tensor):
        raise TypeError(f"{fn}: rois must be a Tensor [K, 1 + 2d], got {type(rois).__name__}")
    if features.dim() < 3:
        raise ValueError(
            f"{fn}: features must be [B, C, *spatial] with at least one spatial dim, got shape "
            f"{tuple(features.shape)}"
        )
    d = features.dim() - 2
    if not features.is_floating_point():
        raise TypeError(f"{fn}: features must have a floating dtype, got {features.dtype}")
    if rois.dim() != 2 or rois.shape[-1] != 1 + 2 * d:
        raise ValueError(
            f"{fn}: rois must be [K, {1 + 2 * d}] = (batch index, lo_1..lo_{d}, hi_1..hi_{d}) for a {d}-D "
            f"feature map {tuple(features.shape)}, got shape {tuple(rois.shape)}"
        )
    if not rois.is_floating_point():
        raise TypeError(f"{fn}: rois must have a floating dtype (boxes are continuous), got {rois.dtype}")
    if rois.device != features.device:
        raise ValueError(f"{fn}: rois is on {rois.device} but features is on {features.device}")
    return d, _output_size(output_size, d)


def _coord_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the box arithmetic: the input dtype (as torchvision) for float32/float64, float32 for the
    16-bit types (half precision cannot hold pixel coordinates beyond 2048 exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _broadcast_view(t: Tensor, d: int, axis: int, has_pairs: bool) -> Tensor:
    """View a per-axis ``[K, P_a(, M_a)]`` as ``[K, 1.., P_a at 1+axis, 1..(, M_a at 1+d+axis, 1..)]``."""
    shape = [t.shape[0]] + [1] * (2 * d if has_pairs else d)
    shape[1 + axis] = t.shape[1]
    if has_pairs:
        shape[1 + d + axis] = t.shape[2]
    return t.view(shape)


def _axis_scale(spatial_scale, d: int, dtype, device):
    """A scalar scale as is; a sequence of ``d`` per-axis scales (array order) as a tensor ``[d]``."""
    if isinstance(spatial_scale, (int, float)):
        return float(spatial_scale)
    t = torch.as_tensor(spatial_scale, dtype=dtype, device=device).reshape(-1)
    if t.numel() == 1:
        return float(t)
    if t.numel() != d:
        raise ValueError(f"spatial_scale must be a number or {d} per-axis numbers, got {tuple(spatial_scale)}")
    return t


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign (Mask R-CNN) of ``rois`` on ``features``, for any number d of spatial dims.

    Args:
        features: ``[B, C, *spatial]`` floating feature map (``[B, C, H, W]`` or ``[B, C, D, H, W]``).
        rois: ``[K, 1 + 2d]`` rows ``(batch index, lo_1..lo_d, hi_1..hi_d)`` in array-axis order, in
            input-image coordinates (multiplied by ``spatial_scale`` to reach feature coordinates). The
            batch index is truncated to an integer and must lie in ``[0, B)`` (not checked: that would
            need a host sync). Box arithmetic runs in the features' dtype (float32 for 16-bit features).
        output_size: int or tuple of d ints ``P_a``.
        spatial_scale: input-image to feature-map scale (e.g. 1/16).
        sampling_ratio: samples per bin per axis; ``<= 0`` selects torchvision's adaptive
            ``ceil(roi_size / output_size)`` per RoI (exact, but one host sync; see module docstring).
        aligned: subtract half a pixel from the scaled box (pixel i covers ``[i, i+1)``, centre ``i+0.5``);
            ``False`` reproduces the legacy behaviour (no offset, RoI size clamped to >= 1).

    Returns:
        ``[K, C, *output_size]``, equal to ``torchvision.ops.roi_align`` in 2D (boxes converted to xyxy).
        Differentiable w.r.t. ``features``; no gradient w.r.t. ``rois``.
    """
    d, out = _check_inputs(features, rois, output_size, "roi_align")
    B, C = features.shape[:2]
    spatial = tuple(features.shape[2:])
    K = rois.shape[0]
    dtype, device = features.dtype, features.device
    sampling_ratio = int(sampling_ratio)
    if math.prod(spatial) == 0 or B == 0:  # nothing to sample from: every sample is outside the map
        return features.new_zeros((K, C, *out))

    cdt = _coord_dtype(dtype)
    rois = rois.detach().to(cdt)
    n_vox = math.prod(spatial)
    batch = rois[:, 0].long()  # [K]
    offset = 0.5 if aligned else 0.0
    scale = _axis_scale(spatial_scale, d, cdt, device)  # float or [d]: per-axis for anisotropic strides
    lo = rois[:, 1 : 1 + d] * scale - offset  # [K, d]
    hi = rois[:, 1 + d :] * scale - offset  # [K, d]
    roi_size = hi - lo  # [K, d]
    if not aligned:
        roi_size = roi_size.clamp(min=1.0)
    out_t = torch.tensor(out, dtype=cdt, device=device)  # [d]
    bin_size = roi_size / out_t  # [K, d]

    adaptive = sampling_ratio <= 0
    if adaptive:
        grid = torch.ceil(roi_size / out_t).clamp(min=0.0)  # [K, d] samples per bin per axis (may be 0)
        # The one host sync of this mode: the grid size must be a Python int.
        grid_max = grid.amax(0).clamp(min=1.0).long().tolist() if K > 0 else [1] * d
        n_samples = tuple(int(g) for g in grid_max)
        count = grid.prod(1).clamp(min=1.0)  # [K]
    else:
        grid = torch.full((K, d), float(sampling_ratio), dtype=cdt, device=device)  # [K, d]
        n_samples = (sampling_ratio,) * d
        count = torch.full((K,), float(sampling_ratio**d), dtype=cdt, device=device)  # [K]

    # rows: flat row of the channels-last table [B*N, C]; weight: interpolation weight / count.
    # embedding_bag takes int32 or int64 rows; int32 halves the [Q, M] index memory when it can hold B*N.
    row_dtype = torch.int32 if B * n_vox < 2**31 else torch.int64
    rows = (batch * n_vox).to(row_dtype).view([K] + [1] * (2 * d))  # [K, 1 x 2d]
    weight = (1.0 / count).view([K] + [1] * (2 * d))  # [K, 1 x 2d]
    stride = n_vox
    for a in range(d):  # loop over the d spatial axes, not over RoIs
        n = spatial[a]
        stride //= n
        p = torch.arange(out[a], dtype=cdt, device=device)  # [P_a]
        s_idx = torch.arange(n_samples[a], dtype=cdt, device=device)  # [G_a]
        start = lo[:, a, None, None]  # [K, 1, 1]
        bs = bin_size[:, a, None, None]  # [K, 1, 1]
        g = grid[:, a, None, None]  # [K, 1, 1]
        # Same evaluation order as torchvision: start + p * bin + (s + 0.5) * bin / grid.
        y = start + p[:, None] * bs + (s_idx + 0.5) * bs / g  # [K, P_a, G_a]
        valid = (y >= -1.0) & (y <= float(n))  # [K, P_a, G_a] torchvision: zero outside [-1, N_a]
        if adaptive:
            valid = valid & (s_idx < g)  # this RoI has only grid[k, a] samples along the axis
        y = y.clamp(min=0.0, max=float(n - 1))  # [-1, 0] -> 0 and [N_a - 1, N_a] -> N_a - 1
        y_lo = y.floor()
        frac = y - y_lo  # [K, P_a, G_a]
        i_lo = y_lo.long().clamp(0, n - 1)  # clamp also tames NaN boxes (their weight is 0)
        i_hi = (i_lo + 1).clamp(max=n - 1)
        idx_a = torch.stack((i_lo, i_hi), -1).flatten(-2)  # [K, P_a, 2*G_a]
        w_a = torch.stack((1.0 - frac, frac), -1)  # [K, P_a, G_a, 2]
        w_a = torch.where(valid[..., None], w_a, torch.zeros((), dtype=cdt, device=device))
        w_a = w_a.flatten(-2)  # [K, P_a, 2*G_a]
        rows = rows + _broadcast_view((idx_a * stride).to(row_dtype), d, a, True)  # [K, P_1.., M_1..]
        weight = weight * _broadcast_view(w_a, d, a, True)  # [K, P_1.., M_1..] (grows)

    Q = K * math.prod(out)
    M = math.prod(2 * s for s in n_samples)
    # [B*N, C] channels-last rows; .contiguous() matters: for B == 1 reshape would give a strided view.
    table = features.movedim(1, -1).contiguous().view(B * n_vox, C)
    rows = rows.expand([K, *out, *(2 * s for s in n_samples)]).reshape(Q, M)  # [Q, M]
    weight = weight.expand([K, *out, *(2 * s for s in n_samples)]).reshape(Q, M)  # [Q, M]
    pooled = F.embedding_bag(rows, table, per_sample_weights=weight.to(dtype), mode="sum")  # [Q, C]
    return pooled.view(K, *out, C).movedim(-1, 1).contiguous()  # [K, C, *P]


def _round_half_away(x: Tensor) -> Tensor:
    """C ``round``: halves go away from zero (``torch.round`` rounds halves to even)."""
    t = x.trunc()
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))


# RoIPool's running (max, argmax) lives in one of two representations ("tables" are tuples of tensors of the
# same shape, each [B, *T_a, C] for the sparse table or [Q, C] for the per-bin accumulator):
#  * packed (float32/float16/bfloat16 and N < 2**32): one int64 key = (order-preserving int32 image of the
#    value as float32) << 32 | (2**32 - 1 - flat spatial index). Integer max of keys = max value, ties to
#    the smallest index. One elementwise op per merge.
#  * general (float64, huge maps): a (value, int index) pair, merged with an explicit tie rule.
_LOW32 = (1 << 32) - 1


def _order_key32(x: Tensor) -> Tensor:
    """int32 whose signed order is the float order of ``x`` (float32; NaN must already be replaced)."""
    bits = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 so the two zeros tie
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _merge_packed(ta: tuple[Tensor, ...], tb: tuple[Tensor, ...], out: tuple[Tensor, ...]) -> None:
    torch.maximum(ta[0], tb[0], out=out[0])


def _merge_general(ta: tuple[Tensor, ...], tb: tuple[Tensor, ...], out: tuple[Tensor, ...]) -> None:
    """Max of two (value, argmax) pairs; ties go to the smaller flat index (first in raster order)."""
    (va, ia), (vb, ib) = ta, tb
    take_b = (vb > va) | ((vb == va) & (ib < ia))
    torch.where(take_b, vb, va, out=out[0])
    torch.where(take_b, ib, ia, out=out[1])


def _with_sentinel(shape: Sequence[int], fills: tuple, dtypes: tuple, device: torch.device) -> tuple:
    """Uninitialised tables of ``shape = [B, *T, C]`` whose flat row ``B*prod(T)`` (one past the end) holds
    ``fills`` (the identity of the max). Returns (tables [B, *T, C] each, row tables [B*prod(T)+1, C])."""
    C = shape[-1]
    n_rows = math.prod(shape[:-1])
    tables, rows = [], []
    for fill, dt in zip(fills, dtypes):
        buf = torch.empty((n_rows + 1, C), dtype=dt, device=device)  # [B*prod(T) + 1, C]
        buf[n_rows].fill_(fill)
        rows.append(buf)
        tables.append(buf[:n_rows].view(shape))  # [B, *T, C]
    return tuple(tables), tuple(rows)


def roi_pool(
    features: Tensor,
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoI max pooling (Fast R-CNN) of ``rois`` on ``features``, for any number d of spatial dims.

    Semantics of ``torchvision.ops.roi_pool`` extended to d dims: box corners are scaled and rounded (half
    away from zero) to integer pixels, the end is inclusive (RoI length ``max(hi - lo + 1, 1)``), bin ``p``
    covers ``[floor(p * L / P) + lo, ceil((p + 1) * L / P) + lo)`` clipped to the map, empty bins give 0,
    NaNs are skipped, a window whose values never exceed ``-FLT_MAX`` gives ``-FLT_MAX``, and the first
    maximum in raster order wins (it receives the bin's whole gradient).

    Args:
        features: ``[B, C, *spatial]`` floating feature map.
        rois: ``[K, 1 + 2d]`` rows ``(batch index, lo_1..lo_d, hi_1..hi_d)`` in array-axis order, in
            input-image coordinates. The batch index must lie in ``[0, B)`` (not checked).
        output_size: int or tuple of d ints.
        spatial_scale: input-image to feature-map scale.

    Returns:
        ``[K, C, *output_size]``. Differentiable w.r.t. ``features``; no gradient w.r.t. ``rois``. Method:
        exact sparse-table (binary-decomposition) max, see the module docstring; cost grows with
        ``prod_a bit_length(N_a)`` passes over the feature map.
    """
    d, out = _check_inputs(features, rois, output_size, "roi_pool")
    B, C = features.shape[:2]
    spatial = tuple(features.shape[2:])
    K = rois.shape[0]
    dtype, device = features.dtype, features.device
    n_vox = math.prod(spatial)
    if n_vox == 0 or B == 0:
        return features.new_zeros((K, C, *out))

    cdt = _coord_dtype(dtype)
    rois = rois.detach().to(cdt)
    batch = rois[:, 0].long()  # [K]
    scale = _axis_scale(spatial_scale, d, cdt, device)
    if isinstance(scale, torch.Tensor):
        scale = scale.repeat(2)  # [2d]
    corners = _round_half_away(rois[:, 1:] * scale).clamp(-(2.0**30), 2.0**30).long()  # [K, 2d]
    roi_start, roi_end = corners[:, :d], corners[:, d:]  # [K, d] integer pixels, end inclusive
    roi_len = (roi_end - roi_start + 1).clamp(min=1)  # [K, d]
    bin_size = roi_len.to(cdt) / torch.tensor(out, dtype=cdt, device=device)  # [K, d]

    # Per axis: window [s, e) of every bin and, per sparse-table level j, its use flag and block start.
    levels = []  # levels[a][j] = (use [K, P_a] bool, pos [K, P_a] long)
    empty = torch.zeros((K, *out), dtype=torch.bool, device=device)  # [K, *P]
    for a in range(d):  # loop over the d spatial axes
        n = spatial[a]
        p = torch.arange(out[a], dtype=cdt, device=device)  # [P_a]
        bs = bin_size[:, a, None]  # [K, 1]
        s = (torch.floor(p * bs).long() + roi_start[:, a, None]).clamp(0, n)  # [K, P_a]
        e = (torch.ceil((p + 1) * bs).long() + roi_start[:, a, None]).clamp(0, n)  # [K, P_a]
        length = (e - s).clamp(min=0)  # [K, P_a]
        empty = empty | _broadcast_view(length == 0, d, a, False)  # [K, *P]
        per_level = []
        for j in range(n.bit_length()):  # levels of the sparse table along this axis (static count)
            use = ((length >> j) & 1).bool()  # [K, P_a]
            pos = (s + (length & ((1 << j) - 1))).clamp(0, n - (1 << j))  # [K, P_a] block start
            per_level.append((use, pos))
        levels.append(per_level)

    Q = K * math.prod(out)
    packed = dtype in (torch.float32, torch.float16, torch.bfloat16) and n_vox <= _LOW32
    merge = _merge_packed if packed else _merge_general
    if packed:
        fills: tuple = (torch.iinfo(torch.int64).min,)
        dtypes: tuple = (torch.int64,)
    else:
        fills, dtypes = (float("-inf"), n_vox), (dtype, torch.int64)
    feats_cl = features.movedim(1, -1)  # [B, *N, C]
    with torch.no_grad():
        values = feats_cl.detach().contiguous()  # [B, *N, C]; channels-last memory keeps every table a view
        values = torch.where(torch.isnan(values), float("-inf"), values)  # [B, *N, C] NaNs never win
        position = torch.arange(n_vox, device=device).view(1, *spatial, 1)  # [1, *N, 1] flat spatial index
        table0, rows0 = _with_sentinel((B, *spatial, C), fills, dtypes, device)
        if packed:
            low = _LOW32 - position  # smaller index -> larger key
            torch.bitwise_or(_order_key32(values.float()).long() << 32, low, out=table0[0])  # [B, *N, C]
        else:
            table0[0].copy_(values)
            table0[1].copy_(position.expand(B, *spatial, C))
        best = tuple(torch.full((Q, C), f, dtype=dt, device=device) for f, dt in zip(fills, dtypes))  # [Q, C]
        batch_q = batch.view([K] + [1] * d)  # [K, 1 x d]

        def visit(table: tuple[Tensor, ...], rows_tab: tuple[Tensor, ...], axis: int, chosen: tuple) -> None:
            if axis == d:  # table for the level tuple `chosen`: one gather per bin (unused -> sentinel row)
                lens = table[0].shape[1:-1]  # T_a
                stride = math.prod(lens)
                rows = batch_q * stride  # [K, 1 x d]
                use = torch.ones((), dtype=torch.bool, device=device)
                for a, j in enumerate(chosen):
                    stride //= lens[a]
                    u, pos = levels[a][j]
                    rows = rows + _broadcast_view(pos * stride, d, a, False)  # [K, P_1..]
                    use = use & _broadcast_view(u, d, a, False)  # [K, P_1..]
                sentinel = rows_tab[0].shape[0] - 1
                rows = torch.where(use, rows, sentinel).expand(K, *out).reshape(Q)  # [Q]
                merge(best, tuple(t[rows] for t in rows_tab), best)  # in place into best [Q, C]
                return
            for j in range(spatial[axis].bit_length()):
                if j > 0:  # block 2**j = blocks 2**(j-1) at i and at i + 2**(j-1); the axis shrinks to T_a
                    shift = 1 << (j - 1)
                    length = table[0].shape[1 + axis] - shift
                    shape = list(table[0].shape)
                    shape[1 + axis] = length
                    new_table, new_rows = _with_sentinel(shape, fills, dtypes, device)  # [B, T_1.., C]
                    merge(
                        tuple(t.narrow(1 + axis, 0, length) for t in table),
                        tuple(t.narrow(1 + axis, shift, length) for t in table),
                        new_table,
                    )
                    table, rows_tab = new_table, new_rows
                visit(table, rows_tab, axis + 1, chosen + (j,))

        visit(table0, rows0, 0, ())
        if packed:
            key = best[0]  # [Q, C]
            found = (key >> 32) > _order_key32(torch.tensor(_NEG_FLT_MAX, device=device))
            best_index = _LOW32 - (key & _LOW32)  # [Q, C]
        else:
            found = best[0] > _NEG_FLT_MAX
            best_index = best[1]
        batch_rows = batch.view([K] + [1] * d).expand(K, *out).reshape(Q, 1)  # [Q, 1]
        flat = batch_rows * n_vox + best_index.clamp(0, n_vox - 1)  # [Q, C] row of [B*N, C]
        flat = flat * C + torch.arange(C, device=device)  # [Q, C] index into feats_cl flattened
        not_empty = ~empty.reshape(Q, 1)  # [Q, 1]
        fill = torch.where(
            not_empty,
            torch.full((), _NEG_FLT_MAX, dtype=dtype, device=device),
            torch.zeros((), dtype=dtype, device=device),
        )  # [Q, 1]
        keep = found & not_empty  # [Q, C]
    gathered = feats_cl.reshape(-1)[flat]  # [Q, C] values at the argmax (the gradient flows here)
    pooled = torch.where(keep, gathered, fill)  # [Q, C]
    return pooled.view(K, *out, C).movedim(-1, 1).contiguous()  # [K, C, *P]


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`: ``forward(features [B, C, *spatial], rois [K, 1 + 2d])``."""

    def __init__(
        self,
        output_size: int | Sequence[int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 2,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = output_size if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = spatial_scale if isinstance(spatial_scale, (int, float)) else tuple(float(v) for v in spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return roi_align(
            features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`: ``forward(features [B, C, *spatial], rois [K, 1 + 2d])``."""

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = output_size if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = spatial_scale if isinstance(spatial_scale, (int, float)) else tuple(float(v) for v in spatial_scale)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return roi_pool(features, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
