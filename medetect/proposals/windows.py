"""Proposal baselines without any look at the image: sliding windows on a regular grid and uniformly random boxes
(the "sliding window" and "uniform" baselines of Hosang et al., "What makes for effective detection proposals?",
TPAMI 2016). Both work for any number d of spatial dims and return ``[N, 2d]`` float32 boxes
``(lo_1..lo_d, hi_1..hi_d)`` in pixels, half-open, inside the image.

Shape key
    d  spatial dims     S  windows of one size     N  all boxes
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["sliding_windows", "uniform_boxes"]


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(int(v) for v in shape)
    if not s or any(v < 1 for v in s):
        raise ValueError(f"shape must be positive spatial sizes (one per axis), got {tuple(shape)}")
    return s


def _window_shapes(sizes: Sequence[float], aspect_ratios: Sequence[float] | None, d: int) -> torch.Tensor:
    """Window extents ``[W, d]``: each size (the geometric mean side) times each aspect ratio h / w (2D only)."""
    s = torch.as_tensor([float(v) for v in sizes], dtype=torch.float64)
    if s.numel() == 0 or bool((s <= 0).any()):
        raise ValueError(f"sizes must be positive numbers, got {list(sizes)}")
    if aspect_ratios is None or len(aspect_ratios) == 0:
        return s[:, None].expand(-1, d).clone()
    if d != 2:
        raise ValueError(f"aspect_ratios (h / w) apply to 2D images only, got a {d}D shape")
    r = torch.as_tensor([float(v) for v in aspect_ratios], dtype=torch.float64)
    if bool((r <= 0).any()):
        raise ValueError(f"aspect_ratios must be positive, got {list(aspect_ratios)}")
    h = s[:, None] * r.sqrt()[None]  # [n_sizes, n_ratios]
    w = s[:, None] / r.sqrt()[None]
    return torch.stack([h, w], -1).reshape(-1, 2)


def sliding_windows(shape: Sequence[int], sizes: Sequence[float], aspect_ratios: Sequence[float] | None = None,
                    stride_fraction: float = 0.5) -> torch.Tensor:
    """Every window of every size (x aspect ratio, 2D) on a regular grid over an image of spatial ``shape``.

    A window of extent ``w_a`` on axis ``a`` (clipped to the image) steps by ``stride_fraction * w_a``; positions
    start at 0 and the last one touches the far edge, so the grid covers the image evenly. Order: by window shape
    (the order of ``sizes``, then ratios), then raster order. Returns float32 ``[N, 2d]``."""
    shp = _shape(shape)
    d = len(shp)
    if not 0 < stride_fraction <= 1:
        raise ValueError(f"stride_fraction must be in (0, 1], got {stride_fraction}")
    extent = torch.as_tensor(shp, dtype=torch.float64)
    wins = torch.minimum(_window_shapes(sizes, aspect_ratios, d), extent)  # [W, d]
    out = []
    for w in wins:  # loop over the few window shapes; the positions of one shape are built at once
        axes = []
        for a in range(d):  # loop over the d axes
            span = float(extent[a] - w[a])
            n = int(math.floor(span / (stride_fraction * float(w[a])) + 1e-9)) + 1
            n = max(n, 2) if span > 0 else 1
            axes.append(torch.linspace(0.0, span, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64))
        lo = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)  # [S, d]
        out.append(torch.cat([lo, lo + w], 1))
    return torch.cat(out).float()


def uniform_boxes(shape: Sequence[int], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` boxes with both edges drawn uniformly on every axis (sorted, at least 1 pixel wide), float32
    ``[n, 2d]``; the same ``seed`` gives the same boxes."""
    shp = _shape(shape)
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    d = len(shp)
    g = torch.Generator().manual_seed(int(seed))
    extent = torch.as_tensor(shp, dtype=torch.float64)
    u = torch.rand(int(n), 2, d, generator=g, dtype=torch.float64) * extent  # [n, 2, d]
    lo, hi = u.min(1).values, u.max(1).values
    hi = torch.minimum(torch.maximum(hi, lo + 1.0), extent)  # at least one pixel, inside the image
    lo = torch.minimum(lo, hi - 1.0).clamp(min=0.0)
    return torch.cat([lo, hi], 1).float()
