"""Box conventions and voxel <-> world coordinates, each named after the convention it speaks.

medetect boxes are ``(lo_1..lo_d, hi_1..hi_d)`` in ARRAY-AXIS order, half-open, in voxel units, and voxel ``i``
covers ``[i, i + 1)`` ("edge" coordinates: the centre of voxel ``i`` is ``i + 0.5``).

Other conventions and how they map:

* torchvision / COCO ``xyxy`` (2D): ``(x0, y0, x1, y1)``, pixels, same edge convention -> reverse the axes of each
  corner. COCO ``xywh``: ``(x0, y0, w, h)``.
* MONAI ``xyzxyz`` (3D): ``(x0, y0, z0, x1, y1, z1)`` in the index order of an ITK image, i.e. the REVERSE of the numpy
  array axes that ``SimpleITK.GetArrayFromImage`` returns (``z, y, x``). MONAI's ``LoadImage`` keeps ITK order, we keep
  numpy order, so the conversion reverses the axes of each corner, exactly as for 2D ``xyxy``.
* World coordinates (SimpleITK, DICOM LPS, LUNA16 ``coordX/Y/Z``) are always ``(x, y, z)`` millimetres. SimpleITK maps a
  *continuous index* ``idx`` (ITK order, voxel CENTRES at integers) to a point ``p = origin + D @ (spacing * idx)``.
  Our coordinates are edges in array order, so ``idx = reversed(coord) - 0.5``. The 0.5 is the classic off-by-half in
  LUNA16 pipelines; here it is done once, in :func:`voxel_to_world` / :func:`world_to_voxel`.

:class:`Geometry` carries the mapping: ``spacing`` per ARRAY axis (``z, y, x`` for a CT, like the boxes), ``origin`` as
a world point ``(x, y, z)`` (the centre of voxel 0, as ITK/DICOM define it) and ``direction`` as ITK's row-major
``d x d`` direction-cosine matrix (world axes as rows, ITK index axes ``i, j, k`` as columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "Geometry",
    "reverse_axes",
    "xyxy_to_boxes",
    "boxes_to_xyxy",
    "xywh_to_boxes",
    "boxes_to_xywh",
    "xyzxyz_to_boxes",
    "boxes_to_xyzxyz",
    "voxel_to_world",
    "world_to_voxel",
    "luna_to_boxes",
    "boxes_to_luna",
]


def _as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    """Return (tensor, was_numpy) so that functions give back what they were given."""
    if isinstance(x, torch.Tensor):
        return x, False
    try:
        return torch.as_tensor(np.asarray(x)), True
    except (TypeError, ValueError) as e:  # pragma: no cover - message path
        raise TypeError(f"{name} must be a tensor or array-like of numbers, got {type(x).__name__}") from e


def _back(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def _check_last(t: torch.Tensor, name: str, size: int | None = None, even: bool = False) -> None:
    if t.ndim == 0:
        raise ValueError(f"{name} must have a last dimension, got a scalar")
    n = t.shape[-1]
    if size is not None and n != size:
        raise ValueError(f"{name} must have shape [..., {size}], got {tuple(t.shape)}")
    if even and (n == 0 or n % 2):
        raise ValueError(f"{name} must have shape [..., 2d] (lo_1..lo_d, hi_1..hi_d), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------- box conventions


def reverse_axes(boxes):
    """Reverse the axis order inside each corner: ``(a0, a1, .., b0, b1, ..) -> (.., a1, a0, .., b1, b0)``.

    Its own inverse. Converts between array-axis order and ITK/torchvision order for any d.
    """
    t, np_in = _as_tensor(boxes, "boxes")
    _check_last(t, "boxes", even=True)
    d = t.shape[-1] // 2
    out = torch.cat([t[..., :d].flip(-1), t[..., d:].flip(-1)], dim=-1)
    return _back(out, np_in)


def xyxy_to_boxes(xyxy):
    """torchvision/COCO ``(x0, y0, x1, y1)`` -> medetect ``(y0, x0, y1, x1)``. Inverse: :func:`boxes_to_xyxy`."""
    t, _ = _as_tensor(xyxy, "xyxy")
    _check_last(t, "xyxy", 4)
    return reverse_axes(xyxy)


def boxes_to_xyxy(boxes):
    """medetect ``(y0, x0, y1, x1)`` -> torchvision ``(x0, y0, x1, y1)``. Inverse: :func:`xyxy_to_boxes`."""
    t, _ = _as_tensor(boxes, "boxes")
    _check_last(t, "boxes", 4)
    return reverse_axes(boxes)


def xywh_to_boxes(xywh):
    """COCO ``(x0, y0, w, h)`` -> medetect ``(y0, x0, y1, x1)``. Inverse: :func:`boxes_to_xywh`."""
    t, np_in = _as_tensor(xywh, "xywh")
    _check_last(t, "xywh", 4)
    x0, y0, w, h = t.unbind(-1)
    return _back(torch.stack([y0, x0, y0 + h, x0 + w], dim=-1), np_in)


def boxes_to_xywh(boxes):
    """medetect ``(y0, x0, y1, x1)`` -> COCO ``(x0, y0, w, h)``. Inverse: :func:`xywh_to_boxes`."""
    t, np_in = _as_tensor(boxes, "boxes")
    _check_last(t, "boxes", 4)
    y0, x0, y1, x1 = t.unbind(-1)
    return _back(torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1), np_in)


def xyzxyz_to_boxes(xyzxyz):
    """MONAI ``(x0, y0, z0, x1, y1, z1)`` (ITK index order) -> medetect ``(z0, y0, x0, z1, y1, x1)``."""
    t, _ = _as_tensor(xyzxyz, "xyzxyz")
    _check_last(t, "xyzxyz", 6)
    return reverse_axes(xyzxyz)


def boxes_to_xyzxyz(boxes):
    """medetect ``(z0, y0, x0, z1, y1, x1)`` -> MONAI ``(x0, y0, z0, x1, y1, z1)``. Inverse: :func:`xyzxyz_to_boxes`."""
    t, _ = _as_tensor(boxes, "boxes")
    _check_last(t, "boxes", 6)
    return reverse_axes(boxes)


# ----------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels sit in the world.

    spacing: voxel size in mm per ARRAY axis (``z, y, x`` for a CT volume; ``y, x`` for a 2D image).
    origin: world position ``(x, y, z)`` in mm of the centre of voxel 0 (ITK/DICOM ImagePositionPatient).
    direction: ITK direction cosines, row-major ``d*d`` (rows: world x, y, z; columns: ITK index i, j, k).
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        d = len(self.spacing)
        if d == 0:
            raise ValueError("Geometry.spacing must have one entry per spatial axis, got ()")
        if len(self.origin) != d:
            raise ValueError(f"Geometry.origin must have {d} entries (x, y, z order), got {len(self.origin)}")
        if len(self.direction) != d * d:
            raise ValueError(f"Geometry.direction must have {d * d} entries (row-major {d}x{d}), got {len(self.direction)}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.spacing):
            raise ValueError(f"Geometry.spacing must be positive and finite, got {self.spacing}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @classmethod
    def identity(cls, ndim: int, spacing: Sequence[float] | None = None) -> "Geometry":
        """Unit (or given) spacing, origin at 0, identity direction: the geometry of a plain 2D picture."""
        eye = np.eye(ndim).reshape(-1)
        return cls(tuple(spacing) if spacing is not None else (1.0,) * ndim, (0.0,) * ndim, tuple(eye))

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        """From a SimpleITK image (which reports spacing in ITK order; we store it in array order)."""
        return cls(tuple(reversed(image.GetSpacing())), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to_sitk(self, image) -> None:
        """Write this geometry into a SimpleITK image (inverse of :meth:`from_sitk`)."""
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def matrix(self) -> np.ndarray:
        """``[d, d]`` matrix M with ``world = origin + M @ itk_index`` (direction times ITK-order spacing)."""
        d = self.ndim
        return np.asarray(self.direction, dtype=np.float64).reshape(d, d) * np.asarray(self.spacing[::-1])[None, :]


def voxel_to_world(coords, geometry: Geometry):
    """Array-order edge coordinates ``[..., d]`` -> world points ``(x, y, z)`` mm ``[..., d]``.

    Equals SimpleITK's ``TransformContinuousIndexToPhysicalPoint(reversed(coords) - 0.5)``.
    Inverse: :func:`world_to_voxel`.
    """
    t, np_in = _as_tensor(coords, "coords")
    _check_last(t, "coords", geometry.ndim)
    m = torch.as_tensor(geometry.matrix(), dtype=torch.float64, device=t.device)
    itk = t.to(torch.float64).flip(-1) - 0.5  # [..., d] ITK continuous index
    world = itk @ m.T + torch.as_tensor(geometry.origin, dtype=torch.float64, device=t.device)
    return _back(world, np_in)


def world_to_voxel(points, geometry: Geometry):
    """World points ``(x, y, z)`` mm ``[..., d]`` -> array-order edge coordinates ``[..., d]`` (float64).

    Inverse of :func:`voxel_to_world`; a LUNA16 centre lands at ``reversed((p - origin) / spacing) + 0.5`` for an
    identity direction.
    """
    t, np_in = _as_tensor(points, "points")
    _check_last(t, "points", geometry.ndim)
    m = torch.as_tensor(geometry.matrix(), dtype=torch.float64, device=t.device)
    rel = t.to(torch.float64) - torch.as_tensor(geometry.origin, dtype=torch.float64, device=t.device)
    itk = rel @ torch.linalg.inv(m).T
    return _back(itk.flip(-1) + 0.5, np_in)


def luna_to_boxes(centres, diameters, geometry: Geometry):
    """LUNA16 nodules (world centre ``(x, y, z)`` mm ``[N, d]``, diameter mm ``[N]``) -> voxel boxes ``[N, 2d]``.

    The box is the cube (in mm) circumscribing the sphere: ``centre +- diameter / 2`` on every axis, expressed in
    voxels of each axis. Inverse: :func:`boxes_to_luna` (exact for such cubes).
    """
    c, np_in = _as_tensor(centres, "centres")
    dia, _ = _as_tensor(diameters, "diameters")
    _check_last(c, "centres", geometry.ndim)
    if dia.shape != c.shape[:-1]:
        raise ValueError(f"diameters must have shape {tuple(c.shape[:-1])} (one per centre), got {tuple(dia.shape)}")
    ctr = world_to_voxel(c, geometry)  # [N, d] array order
    half = dia.to(torch.float64)[..., None] / 2 / torch.as_tensor(geometry.spacing, dtype=torch.float64)
    return _back(torch.cat([ctr - half, ctr + half], dim=-1), np_in)


def boxes_to_luna(boxes, geometry: Geometry):
    """Voxel boxes ``[N, 2d]`` -> (world centres ``(x, y, z)`` ``[N, d]``, diameters mm ``[N]``).

    The diameter is the mean of the box's extents in mm (equal extents for a box made by :func:`luna_to_boxes`).
    """
    t, np_in = _as_tensor(boxes, "boxes")
    _check_last(t, "boxes", 2 * geometry.ndim)
    d = geometry.ndim
    t = t.to(torch.float64)
    ctr = (t[..., :d] + t[..., d:]) / 2
    ext = (t[..., d:] - t[..., :d]) * torch.as_tensor(geometry.spacing, dtype=torch.float64)
    return _back(voxel_to_world(ctr, geometry), np_in), _back(ext.mean(-1), np_in)
