"""Synthetic chest-CT phantoms, written as a dataset in the real LUNA16 layout.

The 3D pipeline (detector, false-positive reduction, FROC) can be trained, tested and demonstrated on these without a
download. Everything about them is made up: the series UIDs use the LIDC/LUNA16 root
``1.3.6.1.4.1.14519.5.2.1.6279.6001.`` so that parsers treat them exactly like LUNA16's, but the 30 trailing digits
come from the seed and name no real series.

What a phantom holds (HU values are typical, each drawn per scan or per object from a small range):

* air outside the body (-1000), an elliptic body cylinder with a subcutaneous fat layer (about -100 HU) around soft
  tissue (about 40 HU), ribs in the chest wall, and a spine (vertebral body with cortical shell, cancellous bone,
  intervertebral discs along z, spinal canal and posterior arch);
* two lungs (parenchyma about -850 HU, denser posteriorly as in supine scans) that taper towards the apex, with the
  heart carved out of the left lung's medial side;
* vessel trees: curved tubes of 1 to 6 mm diameter branching from each hilum, about 40 HU. In a single axial slice a
  vessel is a bright disc exactly like a small nodule: these are the realistic hard negatives;
* nodules: solid spheres (about 0..100 HU), and optionally ground-glass (about -550 HU) or part-solid ones (ground-glass
  halo around a solid core), of diameter 3..30 mm (log-uniform), entirely inside a lung and not overlapping;
* optional "excluded findings" as in LUNA16's ``annotations_excluded.csv``: tiny nodules below 3 mm, and blobs on vessel
  bifurcations (non-nodules, written with ``diameter_mm = -1``);
* Gaussian noise (seeded), values rounded to int16 and clipped to ``[-1024, 3071]`` as scanners do.

Partial volume. Each voxel of a sphere or tube gets the fraction of itself that lies inside the object, mixed with the
background: ``f = clip(1/2 - d / w, 0, 1)`` where ``d`` is the signed distance (mm) from the voxel centre to the surface
and ``w = |n * spacing|`` is the voxel's extent along the surface normal ``n`` (the width of the ramp that matches the
variance of a box projected on ``n``), with ``d`` shifted by ``w^2 / (12 r)`` (spheres; ``/ (24 r)`` for tubes) for the
curvature. It is exact for a plane aligned with an axis and respects anisotropic spacing: the summed fraction of a
sphere equals its volume to within about one percent.

Coordinates. Anatomy is laid out in the ARRAY frame in millimetres (voxel ``i`` has its centre at ``(i + 0.5) * s``),
i.e. the edge coordinate ``c`` of :mod:`medetect.convert` times the spacing. World positions are then always obtained
with :func:`medetect.convert.voxel_to_world` from edge coordinates, for any origin and direction (a flipped axis mirrors
the phantom in the world, which changes nothing about where its nodules are). So
``convert.world_to_voxel(nodule["center_xyz_world"], geometry)`` is the sphere's centre in edge coordinates.

Public API: :func:`make_phantom`, :func:`write_luna16_dataset`, :func:`main` (``python -m medetect.data.phantoms``),
plus :data:`LUNA_UID_PREFIX`, :data:`ANNOTATIONS_HEADER`, :data:`CANDIDATES_HEADER`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..convert import Geometry, voxel_to_world

__all__ = [
    "LUNA_UID_PREFIX",
    "ANNOTATIONS_HEADER",
    "CANDIDATES_HEADER",
    "make_phantom",
    "write_luna16_dataset",
]

#: Root of LIDC-IDRI / LUNA16 series UIDs; synthetic scans append 30 digits drawn from the seed.
LUNA_UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
#: Header of LUNA16's ``annotations.csv`` and ``annotations_excluded.csv``.
ANNOTATIONS_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: Header of LUNA16's ``candidates.csv``.
CANDIDATES_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "class")

HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024, 3071  # what a 12-bit scanner stores

_F32 = np.float32


# ----------------------------------------------------------------------------------------------- small helpers


def _soft(sd, width):
    """Fraction inside a surface from the signed distance ``sd`` (mm, negative inside) and the ramp width (mm)."""
    return np.clip(0.5 - sd / width, 0.0, 1.0).astype(_F32, copy=False)


def _count(n, rng: np.random.Generator, name: str) -> int:
    """An int, or an inclusive ``(lo, hi)`` range drawn from."""
    if isinstance(n, (tuple, list)):
        if len(n) != 2 or int(n[0]) > int(n[1]) or int(n[0]) < 0:
            raise ValueError(f"{name} must be an int >= 0 or an inclusive range (lo, hi), got {n!r}")
        return int(rng.integers(int(n[0]), int(n[1]) + 1))
    if int(n) < 0:
        raise ValueError(f"{name} must be >= 0, got {n!r}")
    return int(n)


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``[n, 3]`` nearly uniform unit vectors."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], axis=-1)


_SPHERE_DIRS = _fibonacci_sphere(160)


def _box(center_mm, radius_mm: float, spacing: np.ndarray, shape) -> tuple[slice, ...] | None:
    """Slices of the voxels whose centres lie within ``radius_mm`` (per axis) of ``center_mm``; None if empty."""
    c = np.asarray(center_mm, dtype=np.float64)
    lo = np.maximum(np.floor((c - radius_mm) / spacing - 0.5).astype(int), 0)
    hi = np.minimum(np.ceil((c + radius_mm) / spacing - 0.5).astype(int) + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _grid(box: tuple[slice, ...], spacing: np.ndarray):
    """Voxel-centre coordinates (mm, array frame) of a box, as broadcastable ``(z[:,1,1], y[1,:,1], x[1,1,:])``."""
    z = ((np.arange(box[0].start, box[0].stop) + 0.5) * spacing[0]).astype(_F32)[:, None, None]
    y = ((np.arange(box[1].start, box[1].stop) + 0.5) * spacing[1]).astype(_F32)[None, :, None]
    x = ((np.arange(box[2].start, box[2].stop) + 0.5) * spacing[2]).astype(_F32)[None, None, :]
    return z, y, x


def _sphere_fraction(center_mm, radius_mm: float, box, spacing: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a sphere over the voxels of ``box`` (see module docstring)."""
    z, y, x = _grid(box, spacing)
    c = np.asarray(center_mm, dtype=_F32)
    dz, dy, dx = z - c[0], y - c[1], x - c[2]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    s = spacing.astype(_F32)
    w = np.sqrt((dz * s[0]) ** 2 + (dy * s[1]) ** 2 + (dx * s[2]) ** 2) / np.maximum(dist, _F32(1e-6))
    w = np.maximum(w, _F32(1e-3))
    # curvature: the shell outside the surface is larger than the one inside; shifting the ramp inwards by
    # w^2 / (12 r) makes the fractions sum to the sphere's volume
    return _soft(dist - _F32(radius_mm) + w * w / _F32(12 * radius_mm), w)


def _segment_fraction(a, b, radius_mm: float, box, spacing: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a capsule (tube from ``a`` to ``b`` with round ends) over ``box``."""
    z, y, x = _grid(box, spacing)
    a = np.asarray(a, dtype=_F32)
    v = np.asarray(b, dtype=_F32) - a
    vv = max(float(v @ v), 1e-12)
    az, ay, ax = z - a[0], y - a[1], x - a[2]
    t = np.clip((az * v[0] + ay * v[1] + ax * v[2]) / _F32(vv), 0.0, 1.0)
    dz, dy, dx = az - t * v[0], ay - t * v[1], ax - t * v[2]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    s = spacing.astype(_F32)
    w = np.sqrt((dz * s[0]) ** 2 + (dy * s[1]) ** 2 + (dx * s[2]) ** 2) / np.maximum(dist, _F32(1e-6))
    w = np.maximum(w, _F32(1e-3))
    return _soft(dist - _F32(radius_mm) + w * w / _F32(24 * radius_mm), w)  # curvature, as for spheres


def _ellipse_sd(dy, dx, ay, ax):
    """Approximate signed distance (mm) to an ellipse with semi-axes ``ay, ax`` (broadcastable; may vary along z).

    The distance along the ray from the centre, ``(q - 1) * r_ray`` with ``q`` the normalised radius: exact on the
    boundary and on the axes, and a close over-estimate elsewhere for the mild eccentricities used here.
    """
    q = np.sqrt((dy / ay) ** 2 + (dx / ax) ** 2)
    rho = np.sqrt(dy * dy + dx * dx)
    r_ray = np.maximum(rho / np.maximum(q, 1e-6), np.minimum(ay, ax))
    return (q - 1.0) * r_ray


def _ellipsoid_sd(dz, dy, dx, az, ay, ax):
    q = np.sqrt((dz / az) ** 2 + (dy / ay) ** 2 + (dx / ax) ** 2)
    rho = np.sqrt(dz * dz + dy * dy + dx * dx)
    r_ray = np.maximum(rho / np.maximum(q, 1e-6), min(az, ay, ax))
    return (q - 1.0) * r_ray


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross is slow for single vectors)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about unit ``axis``."""
    c, s = math.cos(angle), math.sin(angle)
    return v * c + _cross(axis, v) * s + axis * float(axis @ v) * (1 - c)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(math.sqrt(float(v @ v)), 1e-12)


# ----------------------------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    """In-plane layout (array frame, mm) of one phantom, drawn once per scan; fractions of the field of view."""

    fov: np.ndarray  # (z, y, x) mm
    cy: float
    cx: float
    body_ay: float
    body_ax: float
    fat_mm: float
    muscle_mm: float
    rib_mm: float
    wall_mm: float  # fat + muscle + rib + pleura: lungs stay this far inside the body outline
    lungs: tuple[tuple[float, float, float, float], ...]  # (cy, cx, ay, ax) per lung
    heart: tuple[float, float, float, float, float, float]  # (cz, cy, cx, az, ay, ax)
    spine_cy: float
    spine_r: float
    canal_r: float
    taper_c: float
    taper_h: float

    @classmethod
    def draw(cls, fov: np.ndarray, rng: np.random.Generator) -> "_Anatomy":
        fz, fy, fx = (float(v) for v in fov)
        body_ax = fx * rng.uniform(0.41, 0.46)
        body_ay = min(fy * rng.uniform(0.30, 0.35), 0.8 * body_ax)
        cy = fy * (0.5 + rng.uniform(-0.02, 0.02))
        cx = fx * (0.5 + rng.uniform(-0.015, 0.015))
        # wall layers in mm, capped so that tiny test volumes keep room for lungs
        small = min(body_ax, body_ay)
        fat = min(rng.uniform(6.0, 18.0), 0.07 * small)
        muscle = min(rng.uniform(3.0, 7.0), 0.04 * small)
        rib = min(rng.uniform(6.0, 9.0), 0.05 * small)
        wall = fat + muscle + rib + min(2.0, 0.02 * small)
        iax, iay = body_ax - wall, body_ay - wall
        med = iax * rng.uniform(0.16, 0.22)  # mediastinum half-width
        lax = (iax - med) / 2 * 1.04
        lay = iay * rng.uniform(0.86, 0.92)
        lcy = cy - 0.03 * iay
        lungs = ((lcy, cx - med - lax * 0.98, lay, lax), (lcy, cx + med + lax * 0.98, lay, lax))
        heart = (fz * 0.18, cy - 0.18 * iay, cx + 0.14 * iax, fz * 0.38, 0.42 * iay, 0.40 * iax)
        spine_r = 0.2 * iay
        spine_cy = cy + iay - 0.55 * spine_r
        return cls(
            fov=np.asarray(fov, dtype=np.float64), cy=cy, cx=cx, body_ay=body_ay, body_ax=body_ax, fat_mm=fat,
            muscle_mm=muscle, rib_mm=rib, wall_mm=wall, lungs=lungs, heart=heart, spine_cy=spine_cy,
            spine_r=spine_r, canal_r=0.4 * spine_r, taper_c=rng.uniform(0.40, 0.48), taper_h=rng.uniform(0.60, 0.68),
        )

    def body_sd(self, y, x):
        return _ellipse_sd(y - self.cy, x - self.cx, self.body_ay, self.body_ax)

    def spine_sd(self, y, x):
        return np.sqrt((y - self.spine_cy) ** 2 + (x - self.cx) ** 2) - self.spine_r

    def lung_scale(self, z):
        t = z / self.fov[0]
        return np.sqrt(np.clip(1.0 - ((t - self.taper_c) / self.taper_h) ** 2, 0.05**2, 1.0))

    def lung_sd(self, z, y, x):
        """Approximate signed distance (mm, negative inside) to the union of both lungs; broadcasts z, y, x."""
        s = self.lung_scale(z)
        sd = None
        for lcy, lcx, lay, lax in self.lungs:
            d = _ellipse_sd(y - lcy, x - lcx, lay * s, lax * s)
            sd = d if sd is None else np.minimum(sd, d)
        hz, hy, hx, haz, hay, hax = self.heart
        sd = np.maximum(sd, -_ellipsoid_sd(z - hz, y - hy, x - hx, haz, hay, hax))
        sd = np.maximum(sd, self.body_sd(y, x) + self.wall_mm)
        sd = np.maximum(sd, 2.0 - self.spine_sd(y, x))
        return sd

    def lung_sd_points(self, p: np.ndarray) -> np.ndarray:
        """:meth:`lung_sd` at points ``[..., 3]`` (z, y, x mm)."""
        return self.lung_sd(p[..., 0], p[..., 1], p[..., 2])

    def lung_bbox(self, spacing: np.ndarray, shape) -> tuple[slice, ...]:
        y0 = min(l[0] - l[2] for l in self.lungs) - 2 * spacing[1]
        y1 = max(l[0] + l[2] for l in self.lungs) + 2 * spacing[1]
        x0 = min(l[1] - l[3] for l in self.lungs) - 2 * spacing[2]
        x1 = max(l[1] + l[3] for l in self.lungs) + 2 * spacing[2]
        ys = slice(max(int(y0 / spacing[1]), 0), min(int(math.ceil(y1 / spacing[1])), shape[1]))
        xs = slice(max(int(x0 / spacing[2]), 0), min(int(math.ceil(x1 / spacing[2])), shape[2]))
        return (slice(0, shape[0]), ys, xs)


def _render_anatomy(an: _Anatomy, shape, spacing: np.ndarray, rng: np.random.Generator, lung_hu: float):
    """Background volume (float32 HU) and lung fraction (float32), both ``shape``."""
    Z, Y, X = shape
    win = float(np.mean(spacing[1:]))  # ramp width for surfaces that run along z
    full = (slice(0, Z), slice(0, Y), slice(0, X))
    z, y, x = _grid(full, spacing)
    y2, x2 = y[0], x[0]  # [Y,1], [1,X]

    # ---- 2D (Y, X) cross-section shared by all slices
    sd_body = _ellipse_sd(y2 - an.cy, x2 - an.cx, an.body_ay, an.body_ax).astype(_F32)
    soft_hu = rng.uniform(30.0, 55.0)
    base = np.full((Y, X), HU_AIR, dtype=_F32)
    base += _soft(sd_body, win) * (rng.uniform(-115.0, -85.0) - base)  # subcutaneous fat
    base += _soft(sd_body + an.fat_mm, win) * (soft_hu - base)  # muscle, mediastinum
    # spine: vertebral body (cortex + cancellous), posterior arch around the canal
    sd_vb = an.spine_sd(y2, x2).astype(_F32)
    canal_cy = an.spine_cy + an.spine_r + 0.9 * an.canal_r
    sd_canal = (np.sqrt((y2 - canal_cy) ** 2 + (x2 - an.cx) ** 2) - an.canal_r).astype(_F32)
    cortex_hu, canc_hu = rng.uniform(700.0, 1000.0), rng.uniform(200.0, 350.0)
    cortex = max(1.5, 0.5 * win)
    base += _soft(sd_canal - 0.6 * an.canal_r, win) * (cortex_hu - base)  # arch
    base += _soft(sd_vb, win) * (cortex_hu - base)
    canc = _soft(sd_vb + cortex, win)
    base += canc * (canc_hu - base)
    base += _soft(sd_canal, win) * (rng.uniform(5.0, 30.0) - base)  # canal (CSF / cord)

    vol = np.empty(shape, dtype=_F32)
    vol[:] = base[None]

    # ---- intervertebral discs along z (only the spine's box is touched)
    pitch = rng.uniform(24.0, 30.0)
    disc_h = rng.uniform(4.0, 7.0)
    u = np.abs(np.mod(z[:, 0, 0] + rng.uniform(0, pitch), pitch) - pitch / 2)
    disc = _soft(u - _F32(disc_h / 2), _F32(spacing[0]))  # 1 inside a disc, 0 in bone
    sb = _box((0.0, an.spine_cy, an.cx), an.spine_r + 2 * win, spacing, shape)
    if sb is not None:
        sb = (slice(0, Z), sb[1], sb[2])
        vol[sb] += disc[:, None, None] * canc[sb[1], sb[2]][None] * _F32(rng.uniform(60.0, 100.0) - canc_hu)

    # ---- ribs: bands in the chest wall that run down from the spine towards the front, so that each axial slice
    # cuts them into short arcs; computed on the wall's pixels only
    r_out = an.fat_mm + an.muscle_mm
    ring = _soft(np.maximum(sd_body + r_out, -(sd_body + r_out + an.rib_mm)), win)  # [Y, X]
    theta = np.arctan2((y2 - an.cy) / an.body_ay, (x2 - an.cx) / an.body_ax)  # +pi/2: posterior midline
    from_back = np.abs(np.angle(np.exp(1j * (theta - np.pi / 2))))  # angle from the posterior midline, 0..pi
    ring *= (from_back > 0.12) & (from_back < 0.8 * np.pi)  # spine behind, sternum/cartilage in front
    idx = np.flatnonzero(ring > 0)
    if idx.size:
        rpitch = rng.uniform(30.0, 38.0)
        rib_h = rng.uniform(8.0, 11.0)
        slope = rng.uniform(0.25, 0.4)  # mm of descent per mm along the wall
        arc = (from_back * 0.5 * (an.body_ay + an.body_ax)).reshape(-1)[idx]
        ph = z[:, :, 0] + _F32(slope) * arc[None, :].astype(_F32) + _F32(rng.uniform(0, rpitch))  # [Z, N]
        u = np.abs(np.mod(ph, _F32(rpitch)) - _F32(rpitch / 2))
        rf = _soft(u - _F32(rib_h / 2), _F32(spacing[0])) * ring.reshape(-1)[idx][None, :]
        flat = vol.reshape(Z, -1)
        sub = flat[:, idx]
        sub += rf * (_F32(rng.uniform(500.0, 800.0)) - sub)
        flat[:, idx] = sub

    # ---- lungs, computed in their bounding box only
    lb = an.lung_bbox(spacing, shape)
    lz, ly, lx = _grid(lb, spacing)
    sd = an.lung_sd(lz, ly, lx).astype(_F32)
    lf_box = _soft(sd, win)
    lung_map = (lung_hu + 25.0 * (ly[0] - an.lungs[0][0]) / an.lungs[0][2]).astype(_F32)  # posterior denser
    sub = vol[lb]
    sub += lf_box * (lung_map[None] - sub)
    lf = np.zeros(shape, dtype=_F32)
    lf[lb] = lf_box
    return vol, lf, _SdLookup(sd, lb, spacing)


class _SdLookup:
    """Nearest-voxel lookup of the lung signed distance rendered on the grid (fast point queries while growing)."""

    def __init__(self, sd_box: np.ndarray, box: tuple[slice, ...], spacing: np.ndarray):
        self.sd = sd_box
        self.spacing = [float(v) for v in spacing]
        self.lo = [b.start for b in box]
        self.n = list(sd_box.shape)

    def __call__(self, p) -> float:
        i = [math.floor(float(p[k]) / self.spacing[k]) - self.lo[k] for k in range(3)]
        if any(i[k] < 0 or i[k] >= self.n[k] for k in range(3)):
            return math.inf
        return float(self.sd[i[0], i[1], i[2]])


# ----------------------------------------------------------------------------------------------- objects


def _place_spheres(an: _Anatomy, radii: list[float], rng, taken: list[tuple[np.ndarray, float]],
                   gap: float, margin: float, shrink_to: float | None = None, tries: int = 40):
    """Place spheres (mm, array frame) wholly inside the lungs and away from ``taken``; returns [(centre, r)].

    A sphere that fits nowhere is shrunk (down to ``shrink_to``) and, failing that, dropped with a warning.
    """
    lb_lo = np.array([0.0, min(l[0] - l[2] for l in an.lungs), min(l[1] - l[3] for l in an.lungs)])
    lb_hi = np.array([an.fov[0], max(l[0] + l[2] for l in an.lungs), max(l[1] + l[3] for l in an.lungs)])
    out = []
    for r in radii:
        placed = None
        for attempt in range(tries):
            rr = r if shrink_to is None else max(shrink_to, r * 0.85 ** (attempt // 4))
            lo = lb_lo + rr + margin
            hi = lb_hi - rr - margin
            if np.any(hi <= lo):
                continue
            cand = lo + rng.random((64, 3)) * (hi - lo)  # [64, 3]
            ok = an.lung_sd_points(cand) < -(rr + margin)  # cheap pre-filter (sd over-estimates distance)
            if not ok.any():
                continue
            cand = cand[ok]
            surf = cand[:, None, :] + (rr + margin) * _SPHERE_DIRS[None]  # [n, 160, 3]
            ok = (an.lung_sd_points(surf) < 0).all(axis=1)
            for c, r2 in taken + out:
                ok &= np.linalg.norm(cand - c, axis=1) >= rr + r2 + gap
            if ok.any():
                placed = (cand[int(np.flatnonzero(ok)[0])], float(rr))
                break
        if placed is None:
            warnings.warn(f"phantom: no room for a sphere of diameter {2 * r:.1f} mm inside the lungs; dropped it",
                          RuntimeWarning, stacklevel=3)
        else:
            out.append(placed)
    return out


def _grow_vessels(an: _Anatomy, lung_sd, rng: np.random.Generator, max_branches: int,
                  r_root: tuple[float, float], r_min: float, step: float):
    """Vessel trees from each hilum: a list of branches ``(points [n, 3] mm, radius mm)`` and bifurcation points."""
    branches: list[tuple[np.ndarray, float]] = []
    bifurcations: list[tuple[np.ndarray, float]] = []
    per_lung = max_branches // len(an.lungs)
    for lcy, lcx, lay, lax in an.lungs:
        medial = 1.0 if lcx < an.cx else -1.0  # sign of x towards the mediastinum
        root = None
        for _ in range(50):
            p = np.array([an.fov[0] * rng.uniform(0.45, 0.6), lcy + lay * rng.uniform(-0.15, 0.15),
                          lcx + medial * lax * rng.uniform(0.35, 0.6)])
            if lung_sd(p) < -r_root[1]:
                root = p
                break
        if root is None:
            continue
        queue = []
        for d in ([1, 0, 0], [-1, 0, 0], [0.5, -1, -0.5 * medial], [-0.5, -1, -0.5 * medial],
                  [0.5, 1, -0.5 * medial], [-0.5, 1, -0.5 * medial], [0, 0.3, -medial], [0, -0.3, -medial]):
            d = _unit(np.asarray(d, dtype=np.float64) + rng.normal(0, 0.2, 3))
            queue.append((root, d, rng.uniform(*r_root)))
        n = 0
        while queue and n < per_lung:
            p, d, r = queue.pop(0)  # breadth first: a cap on branches prunes the finest level
            length = rng.uniform(8.0, 14.0) * r + 2.0  # thinner vessels run shorter
            pts = [p]
            for _ in range(max(1, int(round(length / step)))):
                # wander a little, and drift away from the hilum so that the tree fills the lung; near the pleura
                # try a few turns before giving up
                q = None
                for turn in (0.15, 0.6, 0.9):
                    dn = _unit(d + rng.normal(0, turn, 3) + 0.15 * _unit(pts[-1] - root))
                    qn = pts[-1] + dn * step
                    if lung_sd(qn) < -r - 0.5:
                        d, q = dn, qn
                        break
                if q is None:
                    break
                pts.append(q)
            if len(pts) < 2:
                continue
            branches.append((np.asarray(pts), float(r)))
            n += 1
            rc = r * rng.uniform(0.7, 0.85)
            if rc >= r_min:
                bifurcations.append((pts[-1], r))
                axis = _unit(_cross(d, rng.normal(0, 1, 3)))
                for sign in (1.0, -1.0):
                    ang = sign * rng.uniform(0.3, 0.65)
                    queue.append((pts[-1], _rotate(d, axis, ang), rc * (1.0 if sign > 0 else rng.uniform(0.8, 1.0))))
    return branches, bifurcations


def _render_vessels(vol, lf, branches, spacing, shape, hu: float) -> None:
    vf = np.zeros(shape, dtype=_F32)  # union of tube fractions (max), touched only where tubes run
    smax = float(np.max(spacing))
    for pts, r in branches:
        for a, b in zip(pts[:-1], pts[1:]):
            lo = np.minimum(a, b) - r - smax
            hi = np.maximum(a, b) + r + smax
            lo_i = np.maximum(np.floor(lo / spacing - 0.5).astype(int), 0)
            hi_i = np.minimum(np.ceil(hi / spacing - 0.5).astype(int) + 1, np.asarray(shape))
            if np.any(hi_i <= lo_i):
                continue
            box = tuple(slice(int(s), int(e)) for s, e in zip(lo_i, hi_i))
            np.maximum(vf[box], _segment_fraction(a, b, r, box, spacing), out=vf[box])
    nz = np.flatnonzero(vf.reshape(shape[0], -1).max(axis=1) > 0)
    if nz.size == 0:
        return
    zs = slice(int(nz[0]), int(nz[-1]) + 1)
    f = vf[zs] * lf[zs]
    sub = vol[zs]
    sub += f * (_F32(hu) - sub)


def _mix_sphere(vol, center_mm, r, hu, spacing) -> None:
    smax = float(np.linalg.norm(spacing))
    box = _box(center_mm, r + smax, spacing, vol.shape)
    if box is None:
        return
    f = _sphere_fraction(center_mm, r, box, spacing)
    sub = vol[box]
    sub += f * (_F32(hu) - sub)


# ----------------------------------------------------------------------------------------------- make_phantom


def _geometry(shape, spacing, origin, direction) -> Geometry:
    if direction is None:
        direction = tuple(np.eye(3).reshape(-1))
    direction = tuple(float(v) for v in np.asarray(direction, dtype=np.float64).reshape(-1))
    if len(direction) != 9:
        raise ValueError(f"direction must be 9 numbers (row-major 3x3), got {len(direction)}")
    dm = np.asarray(direction).reshape(3, 3)
    if not np.allclose(dm @ dm.T, np.eye(3), atol=1e-4):
        raise ValueError("direction must be an orthonormal 3x3 matrix (ITK direction cosines)")
    if origin is None:  # scanner-like: x, y centred on the field of view, z somewhere below the table origin
        fov = np.asarray(shape) * np.asarray(spacing)
        origin = (-fov[2] / 2 + spacing[2] / 2, -fov[1] / 2 + spacing[1] / 2 + 20.0, -fov[0] - 60.0)
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in origin), direction)


def make_phantom(
    shape: Sequence[int] = (128, 256, 256),
    spacing: Sequence[float] = (2.5, 1.4, 1.4),
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    n_nodules: int | tuple[int, int] = 3,
    nodule_diameters_mm: tuple[float, float] = (3.0, 30.0),
    seed: int | np.random.Generator | None = 0,
    noise_std_hu: float = 25.0,
    *,
    subsolid_fraction: float = 0.15,
    n_excluded: int | tuple[int, int] = 0,
    n_vessel_branches: int = 800,
    vessel_diameters_mm: tuple[float, float] = (1.0, 6.0),
    lung_hu: float = -850.0,
    outside_fov_hu: int | None = None,
    return_info: bool = False,
):
    """One synthetic chest CT.

    Args:
        shape: ``(Z, Y, X)`` voxels.
        spacing: mm per ARRAY axis ``(z, y, x)``. The anatomy scales with the field of view ``shape * spacing``;
            the default (2.5, 1.4, 1.4) on 256 x 256 is an adult chest at half LUNA16 resolution.
        origin: world ``(x, y, z)`` mm of voxel 0's centre; None picks a scanner-like non-zero one.
        direction: ITK row-major 3x3 direction cosines (orthonormal); None is the identity.
        n_nodules: count, or an inclusive range ``(lo, hi)`` drawn from. Nodules that find no room are shrunk, then
            dropped with a warning (small volumes with big nodules).
        nodule_diameters_mm: ``(min, max)``; diameters are drawn log-uniformly (small nodules are the common ones).
        seed: int, None or a ``numpy.random.Generator``. Same seed, same phantom (bit for bit).
        noise_std_hu: standard deviation of the Gaussian noise added everywhere but outside the scan circle.
        subsolid_fraction: share of nodules that are non-solid, half pure ground-glass, half part-solid.
        n_excluded: count or range of excluded findings (tiny < 3 mm nodules and vessel-bifurcation blobs).
        n_vessel_branches: cap on vessel branches (both lungs together).
        vessel_diameters_mm: ``(finest, trunk)`` vessel diameters.
        lung_hu: mean HU of lung parenchyma.
        outside_fov_hu: if given (e.g. -2000 or -3024 as in many LUNA16 scans), voxels outside the inscribed
            reconstruction circle get this value.
        return_info: also return a dict with ``lung_mask`` (bool ``[Z, Y, X]``, lung fraction > 1/2), ``vessels``
            (``points_world [N, 3]``, ``radii_mm [N]``, ``bifurcations_world [M, 3]``, ``bifurcation_radii_mm [M]``),
            ``excluded`` (list of dicts like the nodules, ``diameter_mm`` is -1 for non-nodules) and ``vessel_hu``.

    Returns:
        ``(volume, geometry, nodules)`` (plus ``info`` if asked): ``volume`` int16 HU ``[Z, Y, X]``; ``geometry``
        a :class:`medetect.convert.Geometry`; ``nodules`` a list of dicts with ``center_xyz_world`` (x, y, z mm),
        ``diameter_mm``, ``center_voxel`` (array-order edge coordinates), ``type`` ("solid", "part-solid",
        "ground-glass"), ``hu`` (HU of its solid part, or of the ground glass) and ``ggo_hu`` (part-solid only).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (Z, Y, X) with every side >= 8, got {shape}")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or np.any(sp <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x) mm, got {spacing!r}")
    dmin, dmax = (float(v) for v in nodule_diameters_mm)
    if not 0 < dmin <= dmax:
        raise ValueError(f"nodule_diameters_mm must be (min, max) with 0 < min <= max, got {nodule_diameters_mm!r}")
    geom = _geometry(shape, sp, origin, direction)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    fov = np.asarray(shape) * sp
    an = _Anatomy.draw(fov, rng)
    vol, lf, lung_sd = _render_anatomy(an, shape, sp, rng, lung_hu)
    smax = float(sp.max())

    # ---- nodules (positions first: vessels and excluded findings avoid nothing but nodules avoid each other)
    n = _count(n_nodules, rng, "n_nodules")
    diam = np.exp(rng.uniform(math.log(dmin), math.log(dmax), n))
    diam = np.sort(diam)[::-1]  # big ones first: they need the room
    spheres = _place_spheres(an, [d / 2 for d in diam], rng, [], gap=smax, margin=1.0 + 0.5 * smax,
                             shrink_to=dmin / 2)

    # ---- vessels
    r_lo, r_hi = (float(v) / 2 for v in vessel_diameters_mm)
    branches, bifs = _grow_vessels(an, lung_sd, rng, n_vessel_branches, (0.8 * r_hi, r_hi), r_lo,
                                   step=max(3.0, 1.5 * smax))
    vessel_hu = rng.uniform(30.0, 55.0)
    _render_vessels(vol, lf, branches, sp, shape, vessel_hu)

    # ---- excluded findings: tiny nodules and blobs at vessel bifurcations
    excluded = []
    ne = _count(n_excluded, rng, "n_excluded")
    big_bifs = [(p, r) for p, r in bifs if r >= 1.0 and an.lung_sd_points(p) < -4.0]
    for i in range(ne):
        if i % 2 == 1 and big_bifs:
            p, rv = big_bifs[int(rng.integers(len(big_bifs)))]
            rb = min(rv * rng.uniform(1.5, 2.2), 3.0)
            if all(np.linalg.norm(p - c) >= rb + r + 2 * smax for c, r in spheres) and all(
                np.linalg.norm(p - e["_c"]) >= rb + e["_r"] for e in excluded
            ):
                excluded.append({"_c": np.asarray(p), "_r": rb, "kind": "vessel-blob", "diameter_mm": -1.0})
                continue
        taken = spheres + [(e["_c"], e["_r"]) for e in excluded]
        got = _place_spheres(an, [rng.uniform(0.75, 1.45)], rng, taken, gap=2 * smax, margin=1.0)
        for c, r in got:
            excluded.append({"_c": c, "_r": r, "kind": "small-nodule", "diameter_mm": 2 * r})
    for e in excluded:
        _mix_sphere(vol, e["_c"], e["_r"], vessel_hu if e["kind"] == "vessel-blob" else rng.uniform(0, 80), sp)

    # ---- render nodules
    nodules = []
    for c, r in spheres:
        u = rng.random()
        kind = "solid"
        if u < subsolid_fraction / 2:
            kind = "ground-glass"
        elif u < subsolid_fraction:
            kind = "part-solid"
        rec = {"type": kind}
        if kind == "ground-glass":
            rec["hu"] = float(rng.uniform(-650.0, -450.0))
            _mix_sphere(vol, c, r, rec["hu"], sp)
        else:
            rec["hu"] = float(rng.uniform(0.0, 100.0))
            if kind == "part-solid":
                rec["ggo_hu"] = float(rng.uniform(-650.0, -450.0))
                _mix_sphere(vol, c, r, rec["ggo_hu"], sp)
                _mix_sphere(vol, c, r * rng.uniform(0.35, 0.6), rec["hu"], sp)
            else:
                _mix_sphere(vol, c, r, rec["hu"], sp)
        nodules.append((c, r, rec))

    # ---- noise, scanner clipping, int16
    if noise_std_hu > 0:
        vol += rng.standard_normal(shape, dtype=_F32) * _F32(noise_std_hu)
    np.rint(vol, out=vol)
    np.clip(vol, HU_MIN, HU_MAX, out=vol)
    out = vol.astype(np.int16)
    if outside_fov_hu is not None:
        _, y, x = _grid((slice(0, 1), slice(0, shape[1]), slice(0, shape[2])), sp)
        rad = min(fov[1], fov[2]) / 2
        outside = (y[0] - fov[1] / 2) ** 2 + (x[0] - fov[2] / 2) ** 2 > rad**2
        out[:, outside] = np.int16(outside_fov_hu)

    # ---- world coordinates, via convert only
    def world(c_mm):
        return tuple(float(v) for v in voxel_to_world(np.asarray(c_mm, dtype=np.float64) / sp, geom))

    nod_out = []
    for c, r, rec in nodules:
        d = {"center_xyz_world": world(c), "diameter_mm": float(2 * r), "center_voxel": tuple(float(v) for v in c / sp)}
        d.update(rec)
        nod_out.append(d)
    if not return_info:
        return out, geom, nod_out

    vpts = [p for pts, _ in branches for p in pts]
    vrad = [r for pts, r in branches for _ in pts]
    info = {
        "lung_mask": lf > 0.5,
        "vessels": {
            "points_world": voxel_to_world(np.asarray(vpts).reshape(-1, 3) / sp, geom),
            "radii_mm": np.asarray(vrad, dtype=np.float64),
            "bifurcations_world": voxel_to_world(np.asarray([p for p, _ in bifs]).reshape(-1, 3) / sp, geom),
            "bifurcation_radii_mm": np.asarray([r for _, r in bifs], dtype=np.float64),
        },
        "excluded": [
            {"center_xyz_world": world(e["_c"]), "diameter_mm": float(e["diameter_mm"]), "kind": e["kind"],
             "true_diameter_mm": float(2 * e["_r"]), "center_voxel": tuple(float(v) for v in e["_c"] / sp)}
            for e in excluded
        ],
        "vessel_hu": float(vessel_hu),
    }
    return out, geom, nod_out, info


# ----------------------------------------------------------------------------------------------- LUNA16 dataset


def _fmt(v: float, decimals: int) -> str:
    """Plain decimal without trailing zeros (LUNA16 writes e.g. ``-128.6994211`` and ``-317.8``)."""
    s = f"{float(v):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _series_uid(rng: np.random.Generator) -> str:
    digits = [int(rng.integers(1, 10))] + [int(d) for d in rng.integers(0, 10, 29)]
    return LUNA_UID_PREFIX + "".join(map(str, digits))  # 64 characters, the DICOM maximum, like LUNA16's


def _ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A uniform random point in a ball of ``radius`` (mm)."""
    v = rng.normal(size=3)
    return v / max(float(np.linalg.norm(v)), 1e-12) * radius * rng.random() ** (1 / 3)


def _candidates(rng, nodules, info, geom: Geometry, shape, n_vessel: int, n_random: int, max_per_nodule: int):
    """LUNA16-style candidate rows ``(x, y, z, class)`` for one scan (world mm)."""
    rows = []
    ctr = np.asarray([n["center_xyz_world"] for n in nodules], dtype=np.float64).reshape(-1, 3)
    rad = np.asarray([n["diameter_mm"] / 2 for n in nodules], dtype=np.float64)

    def clear_of_nodules(p: np.ndarray, extra: float) -> np.ndarray:  # p [N, 3] world
        if len(ctr) == 0:
            return np.ones(len(p), dtype=bool)
        dist = np.linalg.norm(p[:, None, :] - ctr[None], axis=-1)
        return (dist >= rad[None] + extra).all(axis=1)

    # class 1: one to a few detections per nodule, jittered by up to half the radius (at most 3 mm)
    for c, r in zip(ctr, rad):
        for k in range(int(rng.integers(1, max_per_nodule + 1))):
            rows.append((*(c + (0 if k == 0 and rng.random() < 0.5 else _ball(rng, min(0.5 * r, 3.0)))), 1))
    # class 0 on vessels: the hard negatives, favouring thick vessels and bifurcations
    v = info["vessels"]
    pts = np.concatenate([v["points_world"], v["bifurcations_world"]])
    vr = np.concatenate([v["radii_mm"], v["bifurcation_radii_mm"]])
    keep = (vr >= 0.75) & clear_of_nodules(pts, 3.0)
    pts, vr = pts[keep], vr[keep]
    if len(pts) and n_vessel > 0:
        w = vr**2 / np.sum(vr**2)
        idx = rng.choice(len(pts), size=min(n_vessel, len(pts)), replace=False, p=w)
        for i in idx:
            rows.append((*(pts[i] + _ball(rng, 0.5 * vr[i])), 0))
    # class 0 at random lung positions
    lung = np.flatnonzero(info["lung_mask"].reshape(-1))
    if lung.size and n_random > 0:
        idx = rng.choice(lung.size, size=min(4 * n_random, lung.size), replace=False)
        vox = np.stack(np.unravel_index(lung[idx], shape), axis=-1) + rng.random((idx.size, 3))
        pw = voxel_to_world(vox, geom)
        pw = pw[clear_of_nodules(pw, 3.0)][:n_random]
        rows.extend((*p, 0) for p in pw)
    # class 0 at each excluded finding (LUNA16's candidates there are negatives, ignored by the evaluation)
    for e in info["excluded"]:
        rows.append((*e["center_xyz_world"], 0))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def write_luna16_dataset(
    out_dir,
    n_scans: int = 10,
    seed: int = 0,
    subsets: int = 1,
    *,
    n_nodules: int | tuple[int, int] = (0, 4),
    nodules_per_scan: Sequence[int] | None = None,
    n_excluded: int | tuple[int, int] = (0, 3),
    candidates_per_nodule: int = 3,
    n_vessel_candidates: int = 30,
    n_random_candidates: int = 15,
    **phantom_kw,
) -> dict:
    """Write ``n_scans`` phantoms as a LUNA16 dataset and return a manifest.

    Layout (exactly LUNA16's)::

        out_dir/subset0/<seriesuid>.mhd + .raw   (int16 HU, MET_SHORT, geometry in the header)
        out_dir/annotations.csv                  seriesuid,coordX,coordY,coordZ,diameter_mm
        out_dir/annotations_excluded.csv         same columns; -1 as diameter for non-nodules
        out_dir/candidates.csv                   seriesuid,coordX,coordY,coordZ,class
        out_dir/seriesuids.csv                   one seriesuid per line, no header (as in the evaluation script)

    plus ``out_dir/README.txt`` saying that the data is synthetic. Coordinates are world mm ``(x, y, z)``.

    Args:
        out_dir: created if needed.
        n_scans, seed: scan ``i`` gets its own stream from ``SeedSequence(seed).spawn(n_scans)[i]``: same arguments,
            same files (series UIDs included).
        subsets: scans are dealt round-robin into ``subset0 .. subset{subsets-1}``.
        n_nodules: per-scan count or inclusive range (0 allowed: scans without nodules, as in LUNA16).
        nodules_per_scan: explicit per-scan counts (length ``n_scans``), overriding ``n_nodules``.
        n_excluded: per-scan count or range of excluded findings.
        candidates_per_nodule: class-1 candidates per nodule are 1 .. this many, jittered within the nodule.
        n_vessel_candidates, n_random_candidates: class-0 candidates per scan on vessels and anywhere in the lungs.
        **phantom_kw: passed to :func:`make_phantom` (``shape``, ``spacing``, ``origin``, ``direction``,
            ``nodule_diameters_mm``, ``noise_std_hu``, ...). Without ``spacing`` each scan draws one like LUNA16's:
            in-plane field of view 310..400 mm over the grid, slice spacing 1.25, 1.5, 2.0 or 2.5 mm. Without
            ``origin`` each scan draws a scanner-like one.

    Returns:
        ``{"out_dir", "n_scans", "n_nodules", "n_candidates", "n_positive_candidates", "n_excluded", "scans": [{
        "seriesuid", "subset", "path", "phantom_seed", "shape", "spacing", "origin", "direction", "n_nodules"}],
        "synthetic": True}``. ``make_phantom(seed=scan["phantom_seed"], ...)`` with the scan's shape, spacing,
        origin and the same keywords regenerates a scan.
    """
    import SimpleITK as sitk

    if n_scans < 0:
        raise ValueError(f"n_scans must be >= 0, got {n_scans}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if nodules_per_scan is not None and len(nodules_per_scan) != n_scans:
        raise ValueError(f"nodules_per_scan must have n_scans={n_scans} entries, got {len(nodules_per_scan)}")
    phantom_kw.pop("return_info", None)  # the writer needs the info itself
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in phantom_kw.pop("shape", (128, 256, 256)))
    spacing_kw = phantom_kw.pop("spacing", None)
    origin_kw = phantom_kw.pop("origin", None)

    ann_rows, exc_rows, cand_rows, scans, uids = [], [], [], [], set()
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n_scans)):
        rng = np.random.default_rng(child)
        uid = _series_uid(rng)
        while uid in uids:  # vanishingly unlikely; keeps UIDs unique anyway
            uid = _series_uid(rng)
        uids.add(uid)
        if spacing_kw is None:
            sxy = rng.uniform(310.0, 400.0) / max(shape[1], shape[2])
            spacing = (float(rng.choice([1.25, 1.5, 2.0, 2.5])), round(sxy, 6), round(sxy, 6))
        else:
            spacing = tuple(float(s) for s in spacing_kw)
        if origin_kw is None:
            fov = np.asarray(shape) * np.asarray(spacing)
            origin = (round(-fov[2] / 2 + rng.uniform(-20, 20), 3), round(-fov[1] / 2 + rng.uniform(-10, 40), 3),
                      round(rng.uniform(-400.0, -100.0), 3))
        else:
            origin = tuple(float(o) for o in origin_kw)
        nn = nodules_per_scan[i] if nodules_per_scan is not None else _count(n_nodules, rng, "n_nodules")
        pseed = int(rng.integers(0, 2**63 - 1))
        vol, geom, nodules, info = make_phantom(
            shape=shape, spacing=spacing, origin=origin, n_nodules=int(nn), seed=pseed, n_excluded=n_excluded,
            return_info=True, **phantom_kw,
        )
        subset = f"subset{i % subsets}"
        (out / subset).mkdir(exist_ok=True)
        path = out / subset / f"{uid}.mhd"
        img = sitk.GetImageFromArray(vol)
        geom.apply_to_sitk(img)
        sitk.WriteImage(img, str(path), False)

        for n in nodules:
            ann_rows.append((uid, *n["center_xyz_world"], n["diameter_mm"]))
        for e in info["excluded"]:
            exc_rows.append((uid, *e["center_xyz_world"], e["diameter_mm"]))
        for row in _candidates(rng, nodules, info, geom, shape, n_vessel_candidates, n_random_candidates,
                               max(1, candidates_per_nodule)):
            cand_rows.append((uid, *row))
        scans.append({
            "seriesuid": uid, "subset": subset, "path": str(path), "phantom_seed": pseed, "shape": list(shape),
            "spacing": list(geom.spacing), "origin": list(geom.origin), "direction": list(geom.direction),
            "n_nodules": len(nodules),
        })

    def write(name, header, rows, fmt):
        lines = ([",".join(header)] if header else []) + [fmt(r) for r in rows]
        (out / name).write_text("".join(line + "\n" for line in lines))

    def ann(r):
        return ",".join([r[0], *(_fmt(v, 7) for v in r[1:4]), _fmt(r[4], 7)])

    write("annotations.csv", ANNOTATIONS_HEADER, ann_rows, ann)
    write("annotations_excluded.csv", ANNOTATIONS_HEADER, exc_rows, ann)
    write("candidates.csv", CANDIDATES_HEADER, cand_rows,
          lambda r: ",".join([r[0], *(_fmt(v, 2) for v in r[1:4]), str(int(r[4]))]))
    write("seriesuids.csv", None, [(s["seriesuid"],) for s in scans], lambda r: r[0])
    (out / "README.txt").write_text(
        "SYNTHETIC data written by medetect.data.phantoms in the LUNA16 layout (subsetN/<seriesuid>.mhd/.raw, "
        "annotations.csv, annotations_excluded.csv, candidates.csv, seriesuids.csv).\n"
        "The CT volumes are computer-generated chest phantoms, not patient data. The series UIDs use the "
        f"LIDC/LUNA16 root {LUNA_UID_PREFIX} followed by digits drawn from the seed; they name no real series.\n"
        f"seed={seed} n_scans={n_scans}\n"
    )
    return {
        "out_dir": str(out),
        "n_scans": n_scans,
        "n_nodules": len(ann_rows),
        "n_candidates": len(cand_rows),
        "n_positive_candidates": sum(1 for r in cand_rows if r[4] == 1),
        "n_excluded": len(exc_rows),
        "scans": scans,
        "synthetic": True,
    }
