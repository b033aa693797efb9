"""Synthetic torso CTs with labelled organs (``medetect phantoms --organs``), in the ``organ-ct-sample`` layout.

A phantom is drawn in BODY coordinates (mm): ``bz`` superior (0 = the diaphragm dome), ``by`` posterior, ``bx``
patient left, all relative to the centre of the body's cross-section; the world frame is LPS (x left, y posterior,
z superior) with an identity direction, so array axes ``z, y, x`` run superior, posterior and left.

Anatomy (each organ an ellipsoid, a capsule chain or a stack of blocks, sizes and positions scaled with the body and
jittered per phantom): body (an elliptic cylinder; subcutaneous fat, muscle wall, visceral fat with bowel loops and
gas), ribs and hip bones (unlabelled distractors), lungs (two lobes left, three right, TotalSegmentator ids), heart,
aorta (ascending, arch, descending, abdominal), liver, spleen, stomach (fluid or gas), kidneys, urinary bladder, the
vertebral column (C5..S1 as separate vertebrae plus the sacrum). HU follow the usual values, non-contrast or portal-
venous contrast (aorta 150-300 HU, kidneys 150-250 HU, liver 90-130 HU). Variability: body size, organ size and
position, field of view (thorax, abdomen, abdomen + pelvis, chest + abdomen, whole torso, thin slab, an in-plane crop
around the heart or an abdominal organ), anisotropic spacing, noise, organs truncated by the field of view.

:func:`make_organ_phantom` returns ``(hu int16 [Z, Y, X], labels uint8 [Z, Y, X], Geometry, info)``;
:func:`write_organ_dataset` writes ``volumes/``, ``labels/``, ``boxes.csv``, ``label_tables.json`` and
``summary.json`` exactly as ``organ-ct-sample`` lays them out (boxes from the label maps by
:func:`medetect.organs.data.boxes_from_labels`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..convert import Geometry
from .anatomy import TOTALSEG_IDS, VERTEBRAE

__all__ = ["FIELDS_OF_VIEW", "make_organ_phantom", "write_organ_dataset"]

#: body-z ranges (mm, superior positive, 0 = diaphragm dome) of the fields of view drawn
FIELDS_OF_VIEW = {
    "thorax": (-50.0, 230.0),
    "abdomen": (-300.0, 40.0),
    "abdomen_pelvis": (-490.0, 40.0),
    "chest_abdomen": (-300.0, 230.0),
    "whole": (-490.0, 240.0),
}
_FOV_P = np.array([0.18, 0.2, 0.2, 0.12, 0.12, 0.1, 0.08])  # the five above, a slab, an in-plane crop


class _Canvas:
    """The volume being painted: HU and labels on a grid given by its body-frame origin and spacing."""

    def __init__(self, shape, spacing, origin_body):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.o = np.asarray(origin_body, dtype=np.float64)  # body (z, y, x) of voxel 0's centre
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(self.shape, dtype=np.uint8)

    def region(self, lo, hi):
        """Index slices covering body box [lo, hi] (mm, z y x) and the coordinate arrays there, or None if empty."""
        a = np.floor((np.asarray(lo) - self.o) / self.spacing).astype(int)
        b = np.ceil((np.asarray(hi) - self.o) / self.spacing).astype(int) + 1
        a, b = np.maximum(a, 0), np.minimum(b, self.shape)
        if np.any(b <= a):
            return None
        sl = tuple(slice(int(i), int(j)) for i, j in zip(a, b))
        co = [self.o[k] + self.spacing[k] * np.arange(sl[k].start, sl[k].stop) for k in range(3)]
        return sl, co[0][:, None, None], co[1][None, :, None], co[2][None, None, :]

    def paint(self, sl, mask, hu, label=None):
        view_hu, view_lab = self.hu[sl], self.lab[sl]
        view_hu[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            view_lab[mask] = label


def _ellipsoid(cv: _Canvas, c, semi, hu, label=None, angle=0.0, where=None, extra=None):
    """Paint the ellipsoid at body centre ``c`` (z, y, x) with semi-axes ``semi``, rotated by ``angle`` (rad) in the
    axial plane; ``where(z, y, x)`` restricts it; ``extra(z, y, x, mask)`` may return per-voxel HU."""
    c, semi = np.asarray(c, float), np.asarray(semi, float)
    r = np.array([semi[0], semi[1:].max(), semi[1:].max()])
    reg = cv.region(c - r, c + r)
    if reg is None:
        return
    sl, z, y, x = reg
    dy, dx = y - c[1], x - c[2]
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dy + sa * dx, -sa * dy + ca * dx
    q = ((z - c[0]) / semi[0]) ** 2 + (u / semi[1]) ** 2 + (v / semi[2]) ** 2
    mask = q <= 1.0
    if where is not None:
        mask &= where(z, y, x)
    if mask.any():
        h = extra(z, y, x, mask) if extra is not None else hu
        cv.paint(sl, mask, h, label)


def _capsules(cv: _Canvas, points, radii, hu, label=None):
    """Paint a chain of capsules through body points ``[P, 3]`` with radius per segment."""
    pts = np.asarray(points, float)
    for a, b, r in zip(pts[:-1], pts[1:], radii):  # a handful of segments of one vessel
        reg = cv.region(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if reg is None:
            continue
        sl, z, y, x = reg
        ab = b - a
        t = ((z - a[0]) * ab[0] + (y - a[1]) * ab[1] + (x - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        d2 = (z - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (x - a[2] - t * ab[2]) ** 2
        mask = d2 <= r * r
        if mask.any():
            cv.paint(sl, mask, hu, label)


def _smooth_noise(shape, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """A smooth random field in [-1, 1] (coarse noise, trilinear upsampling): organ texture and bias."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=(1, 1, cells, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


def _draw_fov(rng: np.random.Generator, kind: str | None):
    kinds = [*FIELDS_OF_VIEW, "slab", "crop"]
    k = kind if kind is not None else kinds[int(rng.choice(len(kinds), p=_FOV_P / _FOV_P.sum()))]
    if k == "slab":
        lo = rng.uniform(-300, 150)
        return k, (lo, lo + rng.uniform(20, 80))
    if k == "crop":
        centre = rng.uniform(-200, 120)
        half = rng.uniform(90, 140)
        return k, (centre - half, centre + half)
    if k not in FIELDS_OF_VIEW:
        raise ValueError(f"field of view must be one of {kinds}, got {k!r}")
    lo, hi = FIELDS_OF_VIEW[k]
    return k, (lo + rng.uniform(-20, 20), hi + rng.uniform(-20, 20))


def make_organ_phantom(seed: int | np.random.Generator = 0, *, spacing: Sequence[float] | None = None,
                       spacing_range: tuple[tuple[float, float], tuple[float, float]] = ((0.6, 5.0), (0.6, 1.0)),
                       fov: str | None = None, contrast: bool | None = None, noise_hu: float | None = None,
                       max_shape: int = 512):
    """One torso phantom: ``(hu int16 [Z, Y, X], labels uint8 [Z, Y, X] (TotalSegmentator ids), Geometry, info)``.

    ``spacing`` (mm, z y x) fixes the grid; otherwise slice and in-plane spacing are drawn from ``spacing_range``
    (``(slice lo, hi), (in-plane lo, hi)``). ``fov`` one of :data:`FIELDS_OF_VIEW`, ``"slab"`` or ``"crop"``
    (default: drawn); ``contrast`` portal-venous contrast (default: drawn); ``noise_hu`` noise std (default: drawn
    in 5..30 HU). In-plane size is capped at ``max_shape`` voxels (the spacing grows instead)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    ax_b, ay_b = rng.uniform(135, 190), rng.uniform(95, 135)  # body semi-axes (lateral, AP) mm
    sz = rng.uniform(0.88, 1.12)  # craniocaudal scale
    kind, (zlo, zhi) = _draw_fov(rng, fov)
    zlo, zhi = zlo * sz, zhi * sz
    contrast = bool(rng.random() < 0.5) if contrast is None else bool(contrast)
    noise = float(rng.uniform(5, 30)) if noise_hu is None else float(noise_hu)
    # grid
    if spacing is None:
        (s0, s1), (p0, p1) = spacing_range
        spacing = (rng.uniform(s0, s1), *(rng.uniform(p0, p1),) * 2)
    spacing = np.asarray(spacing, dtype=np.float64)
    if kind == "crop":
        half = rng.uniform(85, 130)
        cy, cx = rng.uniform(-0.3, 0.2) * ay_b, rng.uniform(-0.3, 0.3) * ax_b
        ylo, yhi, xlo, xhi = cy - half, cy + half, cx - half, cx + half
    else:
        margin = rng.uniform(10, 60)
        fy = max(ay_b, ax_b) + margin
        ylo, yhi, xlo, xhi = -fy + rng.uniform(-15, 15), fy, -(ax_b + margin), ax_b + margin
    ext = np.array([zhi - zlo, yhi - ylo, xhi - xlo])
    spacing[1:] = np.maximum(spacing[1:], ext[1:].max() / max_shape)
    shape = np.maximum(np.round(ext / spacing).astype(int), 1)
    cv = _Canvas(shape, spacing, (zlo + spacing[0] / 2, ylo + spacing[1] / 2, xlo + spacing[2] / 2))
    _paint_torso(cv, rng, ax_b, ay_b, sz, contrast)
    # noise: smooth bias + white noise; air outside the body stays noisy too, as in real CT
    cv.hu += 15.0 * _smooth_noise(cv.shape, rng) + rng.normal(0.0, noise, size=cv.shape).astype(np.float32)
    hu = np.clip(np.round(cv.hu), -1024, 3071).astype(np.int16)
    # world: LPS with an identity direction, scanner-like origin
    centre = np.array([rng.uniform(-30, 30), rng.uniform(-200, 0), rng.uniform(-900, 900)])  # x, y, z of body centre
    origin = (centre[0] + cv.o[2], centre[1] + cv.o[1], centre[2] + cv.o[0])
    geom = Geometry(tuple(float(s) for s in spacing), tuple(float(v) for v in origin), tuple(np.eye(3).reshape(-1)))
    info = {"fov": kind, "contrast": contrast, "noise_hu": round(noise, 2), "body_semi_axes_mm": [round(ax_b, 1),
            round(ay_b, 1)], "z_range_mm": [round(zlo, 1), round(zhi, 1)]}
    return hu, cv.lab, geom, info


def _paint_torso(cv: _Canvas, rng: np.random.Generator, ax_b: float, ay_b: float, sz: float, contrast: bool):
    j = lambda s=8.0: rng.normal(0.0, s)  # noqa: E731  position jitter (mm)
    g = lambda lo=0.85, hi=1.15: rng.uniform(lo, hi)  # noqa: E731  size factor
    top, bottom = 260.0 * sz, -500.0 * sz
    fat_in = rng.uniform(8, 35)  # subcutaneous fat thickness
    # body: fat, then muscle wall, then visceral fat
    full = cv.region((bottom, -ay_b, -ax_b), (top, ay_b, ax_b))
    if full is not None:
        sl, z, y, x = full
        r = np.sqrt((y / ay_b) ** 2 + (x / ax_b) ** 2) + 0 * z
        cv.paint(sl, r <= 1.0, rng.uniform(-115, -85))
        rin = 1.0 - fat_in / ay_b
        cv.paint(sl, r <= rin, rng.uniform(35, 55))
        cv.paint(sl, (r <= rin - 0.1) & (z < -30 * sz), rng.uniform(-100, -70))
        # ribs (unlabelled bone) in the thorax and upper abdomen
        ribs = (r > rin - 0.08) & (r < rin - 0.02) & (z > -110 * sz) & (z < 230 * sz) & (y < 0.7 * ay_b)
        ribs &= np.abs(((z + 300.0) % (24.0 * sz)) - 12.0 * sz) < 4.5
        cv.paint(sl, ribs, rng.uniform(350, 700))
        # hip bones (unlabelled)
        hip = (z < -330 * sz) & (z > -470 * sz) & (np.abs(np.abs(x) - 0.62 * ax_b) < 0.1 * ax_b) & (y > -0.3 * ay_b)
        cv.paint(sl, hip, rng.uniform(300, 600))
    # bowel loops and gas in the abdomen and pelvis
    n_bowel = int(rng.integers(25, 45))
    for _ in range(n_bowel):  # random loops (distractors), not boxes
        c = (rng.uniform(-380, -80) * sz, rng.uniform(-0.6, 0.3) * ay_b, rng.uniform(-0.6, 0.6) * ax_b)
        gas = rng.random() < 0.25
        _ellipsoid(cv, c, (rng.uniform(12, 25),) * 3, rng.uniform(-950, -700) if gas else rng.uniform(0, 45))
    hu = {  # (non-contrast, contrast) ranges
        "liver": ((50, 65), (90, 130)), "spleen": ((40, 55), (100, 140)), "kidney": ((25, 40), (150, 250)),
        "blood": ((35, 50), (150, 300)), "heart": ((35, 50), (120, 250)),
    }
    h = {k: rng.uniform(*v[int(contrast)]) for k, v in hu.items()}
    tex = lambda amp: (lambda z, y, x, m: h_cur[0] + amp * _smooth_noise(m.shape, rng, 4))  # noqa: E731
    h_cur = [0.0]
    ids = TOTALSEG_IDS
    # lungs (two lobes left, three right), cut off below by the diaphragm
    lung_hu = rng.uniform(-880, -800)
    base = rng.uniform(-30, -5) * sz
    for side in (-1, 1):
        c = (95 * sz + j(), j(5), side * 0.45 * ax_b + j(5))
        semi = (125 * sz * g(), 0.72 * ay_b * g(0.9, 1.1), 0.36 * ax_b * g(0.9, 1.1))
        split = c[0] + rng.uniform(-20, 20)

        def lobes(z, y, x, m, side=side, split=split):
            return np.full(m.shape, lung_hu, np.float32) + 20 * _smooth_noise(m.shape, rng, 4)

        upper = (lambda z, y, x, s=split: (z > base) & (z - 0.5 * y > s))
        lower = (lambda z, y, x, s=split: (z > base) & (z - 0.5 * y <= s))
        if side > 0:  # patient left
            _ellipsoid(cv, c, semi, 0, ids["lung_upper_lobe_left"], where=upper, extra=lobes)
            _ellipsoid(cv, c, semi, 0, ids["lung_lower_lobe_left"], where=lower, extra=lobes)
        else:
            middle = (lambda z, y, x, s=split: (z > base) & (z - 0.5 * y <= s) & (y < -0.15 * ay_b) & (z > s - 70))
            _ellipsoid(cv, c, semi, 0, ids["lung_upper_lobe_right"], where=upper, extra=lobes)
            _ellipsoid(cv, c, semi, 0, ids["lung_lower_lobe_right"], where=lower, extra=lobes)
            _ellipsoid(cv, c, semi, 0, ids["lung_middle_lobe_right"], where=middle, extra=lobes)
    # abdominal organs
    h_cur[0] = h["liver"]
    _ellipsoid(cv, (-55 * sz + j(), -0.05 * ay_b + j(), -0.38 * ax_b + j()),
               (85 * sz * g(), 0.7 * ay_b * g(), 0.5 * ax_b * g()), 0, ids["liver"], angle=rng.uniform(-0.2, 0.2),
               where=lambda z, y, x: x < 0.25 * ax_b, extra=tex(8))
    h_cur[0] = h["spleen"]
    _ellipsoid(cv, (-55 * sz + j(), 0.4 * ay_b + j(), 0.6 * ax_b + j(5)), (50 * sz * g(), 45 * g(), 22 * g()), 0,
               ids["spleen"], angle=rng.uniform(0.3, 0.8), extra=tex(6))
    # stomach: wall + fluid or gas
    sc, ss = (-45 * sz + j(), -0.3 * ay_b + j(), 0.33 * ax_b + j()), (55 * sz * g(), 0.33 * ay_b * g(), 45 * g())
    _ellipsoid(cv, sc, ss, rng.uniform(30, 50), ids["stomach"], angle=rng.uniform(-0.4, 0.4))
    content = rng.uniform(-950, -800) if rng.random() < 0.5 else rng.uniform(0, 30)
    _ellipsoid(cv, sc, np.asarray(ss) - 5, content, ids["stomach"])
    for side, name in ((1, "kidney_left"), (-1, "kidney_right")):
        h_cur[0] = h["kidney"]
        zc = (-140 if side > 0 else -155) * sz + j()
        _ellipsoid(cv, (zc, 0.42 * ay_b + j(5), side * 0.4 * ax_b + j(5)), (55 * sz * g(), 27 * g(), 26 * g()), 0,
                   ids[name], angle=side * rng.uniform(0.2, 0.6), extra=tex(15))
    fill = g(0.6, 1.3)
    _ellipsoid(cv, (-410 * sz + j(), -0.35 * ay_b + j(5), j(5)), (35 * fill, 38 * fill, 45 * fill),
               rng.uniform(0, 15), ids["urinary_bladder"])
    # heart over the lungs, then the aorta
    h_cur[0] = h["heart"]
    _ellipsoid(cv, (60 * sz + j(), -0.28 * ay_b + j(), 0.1 * ax_b + j()), (60 * sz * g(), 50 * g(), 65 * g()), 0,
               ids["heart"], angle=rng.uniform(-0.7, -0.3), extra=tex(25))
    ysp = 0.45 * ay_b + j(4)  # vertebral body centre (AP)
    ra = g(0.85, 1.2)
    path = np.array([
        (85 * sz, -0.2 * ay_b, 0.03 * ax_b), (150 * sz, -0.15 * ay_b, 0.02 * ax_b), (175 * sz, 0.05 * ay_b, 0.06 * ax_b),
        (150 * sz, ysp - 40, 0.1 * ax_b), (0.0, ysp - 38, 0.1 * ax_b), (-240 * sz, ysp - 35, 0.04 * ax_b),
    ]) + rng.normal(0, 4, size=(6, 3))
    _capsules(cv, path, np.array([15, 14, 13, 12, 10]) * ra, h["blood"], ids["aorta"])
    # vertebral column: C5..S1 as blocks (body + spinous process), then the sacrum
    z_top = 210 * sz + j()
    heights = np.array([18.0] * 3 + list(np.linspace(21, 27, 12)) + [31.0] * 5 + [28.0]) * sz
    bone = rng.uniform(220, 400)
    edges = z_top - np.concatenate([[0.0], np.cumsum(heights)])
    for (name, _), z1, z0 in zip(VERTEBRAE, edges[:-1], edges[1:]):  # ~21 vertebrae of one column
        w = 14.0 if "C" in name else 18.0
        reg = cv.region((z0, ysp - w, -w * 1.3), (z1, ysp + 45, w * 1.3))
        if reg is None:
            continue
        sl, z, y, x = reg
        inside = (z >= z0 + 2) & (z < z1 - 2)
        body = (((y - ysp) / w) ** 2 + (x / (w * 1.25)) ** 2 <= 1) & inside
        arch = (y > ysp + w) & (y < ysp + 45) & (np.abs(x) < 6 + 10 * ((y - ysp) < w + 12)) & inside
        cv.paint(sl, body | arch, bone, ids[name])
    _ellipsoid(cv, (edges[-1] - 50 * sz, ysp + 10, 0.0), (50 * sz, 25, 45), bone, ids["sacrum"])


def write_organ_dataset(out: str | Path, n: int, seed: int = 0, *, prefix: str = "phantom", **kw) -> dict:
    """Write ``n`` phantoms (seeds ``seed, seed + 1, ...``) into ``out`` in the ``organ-ct-sample`` layout; keyword
    arguments go to :func:`make_organ_phantom`. Returns the summary (also written to ``summary.json``)."""
    from ..data.image import MedicalImage
    from ..data.io import write_image
    from .data import boxes_from_labels, write_boxes_csv

    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    names = {v: k for k, v in TOTALSEG_IDS.items()}
    rows, summary = [], {}
    for i in range(n):  # one phantom per file
        case = f"{prefix}_{seed + i:04d}"
        hu, lab, geom, info = make_organ_phantom(seed + i, **kw)
        write_image(MedicalImage(hu[None], geom), out / "volumes" / f"{case}.nii.gz")
        write_image(MedicalImage(lab[None], geom), out / "labels" / f"{case}.nii.gz")
        rows += boxes_from_labels(lab, geom, names, case=case)
        summary[case] = {"shape_zyx": list(hu.shape), "spacing_xyz": [round(s, 4) for s in geom.spacing[::-1]],
                         "origin_xyz": [round(o, 3) for o in geom.origin], "direction": list(geom.direction),
                         "labels": sorted({names[int(v)] for v in np.unique(lab) if v}), **info}
    write_boxes_csv(out / "boxes.csv", rows)
    (out / "label_tables.json").write_text(json.dumps({"totalsegmentator_total_v2": {str(k): v for k, v in
                                                                                       sorted(names.items())}},
                                                      indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"cases": n, "seed": seed, "out": str(out), "boxes": len(rows)}
