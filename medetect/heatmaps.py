"""Boxes and lesion circles/spheres -> Gaussian heatmaps, and the geometric hit tests of the attention metrics.

Shape key: ``N`` lesions, ``d`` spatial dims, ``S = (S_1 .. S_d)`` the grid, ``M`` points.

Grid convention (the library's edge convention): voxel ``i`` covers ``[i, i + 1)`` and its centre is ``i + 0.5``;
centres, boxes and radii are given in the same continuous voxel coordinates (array-axis order).

One Gaussian per lesion, separable and axis-aligned::

    g(x) = prod_a exp(-0.5 * ((x_a + 0.5 - c_a) / sigma_a) ** 2)        (value 1 at the continuous centre)

* a box ``(lo.., hi..)``: ``c = (lo + hi) / 2`` and ``sigma_a = sigma_factor * (hi_a - lo_a)``;
* a circle / sphere (MIAS centre + radius, LUNA centre + diameter / 2): ``c`` the centre and
  ``sigma_a = sigma_factor * 2 * radius / spacing_a`` -- the radius is PHYSICAL (mm, or pixels when ``spacing`` is
  1), so an anisotropic grid gets a narrower Gaussian, in voxels, along its coarse axes.

``sigma_factor`` (default :data:`SIGMA_FACTOR` = 1/4): the box edge, or the circle, lies at 2 sigma from the centre,
where the Gaussian is ``exp(-2) = 0.135`` of its peak (Pesce et al. 2019 turn boxes into heatmaps with a Gaussian
kernel; the factor is our choice and documented here).

Several lesions combine by the pointwise MAX (overlapping lesions do not add up to more than one lesion). Then
``normalise``: ``"peak"`` divides by the map's maximum (max exactly 1), ``"sum"`` by its sum (a distribution over the
voxels, for KL-divergence supervision), ``"none"`` keeps the raw maximum of unit-peak Gaussians. No lesion: the map is
all zeros whatever ``normalise`` is (callers treat a zero map as "no heatmap").

Bad input is an error naming the lesion index: a zero-size box or a radius <= 0 (a Gaussian with sigma 0 is not a
heatmap), a box or centre lying entirely outside the grid, non-finite values. Lesions partly outside the grid are
kept (their Gaussian is cut by the border).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SIGMA_FACTOR", "NORMALISE", "gaussian_heatmap", "box_heatmap", "circle_heatmap", "circle_mask",
           "points_in_circles"]

SIGMA_FACTOR = 0.25  # sigma = extent / 4: the box edge / circle at 2 sigma
NORMALISE = ("peak", "sum", "none")


def _spacing(spacing, d: int, dtype, device) -> torch.Tensor:
    if spacing is None:
        return torch.ones(d, dtype=dtype, device=device)
    sp = torch.as_tensor(spacing, dtype=dtype, device=device).reshape(-1)
    if sp.numel() == 1:
        sp = sp.expand(d)
    if sp.numel() != d or not bool((sp > 0).all()):
        raise ValueError(f"spacing must be {d} positive numbers (one per array axis), got {list(sp.tolist())}")
    return sp


def _grid_shape(shape: Sequence[int], d: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != d or any(s < 1 for s in shape):
        raise ValueError(f"shape must be {d} positive sizes (one per axis of the lesions), got {shape}")
    return shape


def gaussian_heatmap(centres: torch.Tensor, sigmas: torch.Tensor, shape: Sequence[int], *,
                     normalise: str = "peak") -> torch.Tensor:
    """Max-combination of axis-aligned Gaussians ``[N, d]`` centres / ``[N, d]`` sigmas (voxels) on the grid
    ``shape`` -> ``[*S]`` float32 (module docstring for the grid and ``normalise``). Centres may lie outside the grid
    (the callers decide: :func:`box_heatmap` needs overlap, :func:`circle_heatmap` a centre inside)."""
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {list(NORMALISE)}, got {normalise!r}")
    centres = torch.as_tensor(centres, dtype=torch.float32)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=centres.device)
    if centres.ndim != 2 or sigmas.shape != centres.shape:
        raise ValueError(f"centres and sigmas must both be [N, d], got {tuple(centres.shape)} and {tuple(sigmas.shape)}")
    d = centres.shape[1]
    shape = _grid_shape(shape, d)
    if centres.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.float32, device=centres.device)
    bad = ~(torch.isfinite(centres).all(1) & torch.isfinite(sigmas).all(1))
    if bool(bad.any()):
        raise ValueError(f"lesion {int(bad.nonzero()[0])} has a non-finite centre or size")
    bad = ~(sigmas > 0).all(1)
    if bool(bad.any()):
        raise ValueError(f"lesion {int(bad.nonzero()[0])} has zero size (sigma 0): a zero-size box or a radius of 0 "
                         "has no heatmap")
    g = None
    for a, n in enumerate(shape):  # loop over the d axes (separable Gaussian), never over lesions
        x = torch.arange(n, dtype=torch.float32, device=centres.device) + 0.5  # [S_a] voxel centres
        ga = torch.exp(-0.5 * ((x[None, :] - centres[:, a:a + 1]) / sigmas[:, a:a + 1]) ** 2)  # [N, S_a]
        ga = ga.reshape(ga.shape[0], *([1] * a), n, *([1] * (d - a - 1)))  # [N, 1.., S_a, 1..]
        g = ga if g is None else g * ga  # -> [N, *S]
    m = g.amax(0)  # [*S]: max over lesions
    if normalise == "peak":
        m = m / m.amax().clamp_min(torch.finfo(m.dtype).tiny)
    elif normalise == "sum":
        m = m / m.sum().clamp_min(torch.finfo(m.dtype).tiny)
    return m


def box_heatmap(boxes: torch.Tensor, shape: Sequence[int], *, sigma_factor: float = SIGMA_FACTOR,
                normalise: str = "peak") -> torch.Tensor:
    """Boxes ``[N, 2d]`` ``(lo.., hi..)`` in voxels -> heatmap ``[*S]``; sigma per axis ``sigma_factor * extent``.
    A box with no overlap with the grid is an error; one partly outside is cut by the border."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[1] % 2 or boxes.shape[1] == 0:
        raise ValueError(f"boxes must be [N, 2d], got {tuple(boxes.shape)}")
    if not sigma_factor > 0:
        raise ValueError(f"sigma_factor must be positive, got {sigma_factor}")
    d = boxes.shape[1] // 2
    shape = _grid_shape(shape, d)
    lo, hi = boxes[:, :d], boxes[:, d:]
    if boxes.shape[0]:
        bad = ~(hi > lo).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"box {i} {boxes[i].tolist()} has zero size (hi <= lo on some axis): it has no heatmap")
        top = torch.tensor(shape, dtype=torch.float32, device=boxes.device)
        bad = ~((hi > 0) & (lo < top)).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"box {i} {boxes[i].tolist()} lies outside the grid {list(shape)}")
    return gaussian_heatmap((lo + hi) / 2, sigma_factor * (hi - lo), shape, normalise=normalise)


def circle_heatmap(centres: torch.Tensor, radii: torch.Tensor, shape: Sequence[int], *, spacing=None,
                   sigma_factor: float = SIGMA_FACTOR, normalise: str = "peak") -> torch.Tensor:
    """Circles / spheres (centres ``[N, d]`` in voxels, radii ``[N]`` in physical units of ``spacing``, default 1
    per axis) -> heatmap ``[*S]``; sigma per axis ``sigma_factor * 2 * radius / spacing_a``."""
    centres = torch.as_tensor(centres, dtype=torch.float32)
    radii = torch.as_tensor(radii, dtype=torch.float32, device=centres.device).reshape(-1)
    if centres.ndim != 2 or radii.shape[0] != centres.shape[0]:
        raise ValueError(f"centres must be [N, d] and radii [N], got {tuple(centres.shape)} and {tuple(radii.shape)}")
    if not sigma_factor > 0:
        raise ValueError(f"sigma_factor must be positive, got {sigma_factor}")
    bad = ~(radii > 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"lesion {i} has radius {float(radii[i]):g}: a radius must be > 0 for a heatmap")
    sp = _spacing(spacing, centres.shape[1], torch.float32, centres.device)
    hi = torch.tensor(_grid_shape(shape, centres.shape[1]), dtype=torch.float32, device=centres.device)
    bad = ~((centres >= 0) & (centres <= hi)).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"lesion {i} centre {centres[i].tolist()} lies outside the grid {list(hi.int().tolist())}")
    return gaussian_heatmap(centres, sigma_factor * 2 * radii[:, None] / sp, shape, normalise=normalise)


def points_in_circles(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, *, spacing=None) -> torch.Tensor:
    """``[M, N]`` bool: point ``m`` (voxel coordinates) lies inside circle/sphere ``n`` (physical distance
    ``<= radius``; a point on the circle counts as inside)."""
    points = torch.as_tensor(points, dtype=torch.float32)
    centres = torch.as_tensor(centres, dtype=torch.float32, device=points.device)
    radii = torch.as_tensor(radii, dtype=torch.float32, device=points.device).reshape(-1)
    d = centres.shape[1] if centres.ndim == 2 else points.shape[-1]
    sp = _spacing(spacing, d, torch.float32, points.device)
    diff = (points[:, None, :] - centres[None, :, :]) * sp  # [M, N, d] physical
    return (diff ** 2).sum(-1) <= radii[None, :] ** 2


def circle_mask(centres: torch.Tensor, radii: torch.Tensor, shape: Sequence[int], *, spacing=None) -> torch.Tensor:
    """``[N, *S]`` bool: voxel (by its centre ``i + 0.5``) inside lesion ``n``. ``.any(0)`` is the union."""
    centres = torch.as_tensor(centres, dtype=torch.float32)
    d = centres.shape[1] if centres.ndim == 2 else len(shape)
    shape = _grid_shape(shape, d)
    axes = [torch.arange(n, dtype=torch.float32, device=centres.device) + 0.5 for n in shape]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)  # [prod S, d]
    inside = points_in_circles(pts, centres.reshape(-1, d), radii, spacing=spacing)  # [prod S, N]
    return inside.T.reshape(-1, *shape)
