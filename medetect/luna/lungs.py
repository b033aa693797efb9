"""The lungs of a whole chest CT, for restricting nodule marks to where nodules can be (the candidate filter of
LUNA16 systems).

:func:`lung_mask`: air (below ``threshold`` HU) that is not connected to the volume's in-plane border (the air
around the patient) and belongs to a large component (the lungs and main airways); then, slice by slice, each lung
region is replaced by its convex hull (scikit-image), so that nodules and tumours attached to the chest wall or the
mediastinum (bays and holes in the air mask) are inside, as LUNA16 systems do. Computed on a grid of about ``grid_mm`` in plane (cheap: well under a
second for a 512 x 512 x 300 CT). :func:`marks_in_lungs` tells which world-mm marks fall inside.

Only for WHOLE chest CTs: on a crop of lung tissue (the 50 mm cubes and their mosaics) the lung air touches the
border and would be removed with the outside air; a volume with no lung found raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as label2d
from skimage.morphology import convex_hull_image

from ..convert import Geometry, world_to_voxel

__all__ = ["lung_mask", "marks_in_lungs"]


def _hulls(mask2d: np.ndarray, min_pixels: int) -> np.ndarray:
    """The union of the convex hulls of the 2D mask's components of at least ``min_pixels`` pixels."""
    lab = label2d(mask2d, connectivity=2)
    out = np.zeros_like(mask2d)
    for k in range(1, int(lab.max()) + 1):  # a loop over the few lung regions of one slice
        comp = lab == k
        if comp.sum() >= min_pixels:
            out |= convex_hull_image(comp)
    return out


def lung_mask(hu: np.ndarray, spacing_zyx, *, threshold: float = -320.0, grid_mm: float = 2.0,
              min_fraction: float = 0.1, min_region_mm2: float = 100.0) -> tuple[np.ndarray, tuple[int, int]]:
    """``hu [Z, Y, X]`` -> (mask on the in-plane subsampled grid ``[Z, Y // s, X // s]``, the steps ``(s, s)``)."""
    hu = np.asarray(hu)
    if hu.ndim == 4 and hu.shape[0] == 1:
        hu = hu[0]
    if hu.ndim != 3:
        raise ValueError(f"lung_mask needs a CT volume [Z, Y, X], got shape {hu.shape}")
    sz, sy, sx = (float(v) for v in spacing_zyx)
    step = max(1, int(round(grid_mm / max(min(sy, sx), 1e-6))))
    small = hu[:, ::step, ::step]
    air = small < threshold
    lab, n = ndi.label(air)
    if n == 0:
        raise ValueError("no air in the volume: not a chest CT (lung mask)")
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    inside = air & ~np.isin(lab, border)
    lab, n = ndi.label(inside)
    if n == 0:
        raise ValueError("no air enclosed by the body: not a whole chest CT (lung mask)")
    sizes = ndi.sum(inside, lab, np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    mask = np.isin(lab, keep)
    min_pixels = max(1, int(min_region_mm2 / (sy * sx * step * step)))
    mask = np.stack([_hulls(sl, min_pixels) if sl.any() else sl for sl in mask])
    return mask, (step, step)


def marks_in_lungs(mask: np.ndarray, steps: tuple[int, int], geometry: Geometry, centres_xyz: np.ndarray) -> np.ndarray:
    """Which marks (world mm ``(x, y, z)``, ``[M, 3]``) lie inside ``mask`` (from :func:`lung_mask`)."""
    c = np.asarray(centres_xyz, dtype=np.float64).reshape(-1, 3)
    if not len(c):
        return np.zeros(0, bool)
    vox = np.asarray(world_to_voxel(c, geometry), dtype=np.float64).reshape(-1, 3)  # array order, edge units
    idx = np.floor(vox / np.array([1.0, steps[0], steps[1]])).astype(np.int64)
    ok = ((idx >= 0) & (idx < np.array(mask.shape))).all(1)
    out = np.zeros(len(c), bool)
    out[ok] = mask[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out
