"""Canonical orientation: the same physical image, its array axes permuted and reversed so that they run along the
world axes in the positive direction (LPS for CT: array ``z, y, x`` = superior, posterior, patient left).

Files store one anatomy in many array layouts: a DICOM series sorted by slice position has an identity direction, a
NIfTI written by dcm2niix or nibabel usually has its rows and columns reversed (direction ``diag(-1, -1, 1)``), some
have their slices reversed or the axes swapped. A model that knows where organs lie in the body (left and right
kidneys are different classes) must see one layout, so the organ localiser reorients every CT with
:func:`to_canonical` before the detector and maps its boxes back to the input grid with
:meth:`Reorientation.boxes_to_input`.

Only axis permutations and reversals are applied (exact, no resampling): each ITK index axis goes to the world axis
its direction column points along most (the assignment that maximises the summed alignment), so an oblique scan
keeps its small residual rotation. Any d, 2D and 3D alike.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..convert import Geometry
from .image import MedicalImage

__all__ = ["Reorientation", "canonical_orientation", "to_canonical"]


@dataclass(frozen=True)
class Reorientation:
    """How a canonical array derives from the input array: canonical spatial axis ``k`` is input spatial axis
    ``perm[k]``, reversed when ``flip[k]``; ``in_shape`` is the input's spatial shape (array order)."""

    perm: tuple[int, ...]
    flip: tuple[bool, ...]
    in_shape: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm))) and not any(self.flip)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.in_shape[j] for j in self.perm)

    def array(self, a: np.ndarray, *, channels: bool = True) -> np.ndarray:
        """The canonical view of an input-grid array (``[C, *spatial]``, or spatial only with ``channels=False``)."""
        c = 1 if channels else 0
        out = np.transpose(a, tuple(range(c)) + tuple(c + j for j in self.perm))
        axes = tuple(c + k for k, f in enumerate(self.flip) if f)
        return np.flip(out, axes) if axes else out

    def _map(self, boxes, to_input: bool):
        b = torch.as_tensor(boxes)
        d = len(self.perm)
        if b.numel() == 0:
            return b.reshape(-1, 2 * d).clone()
        b = b.reshape(-1, 2 * d)
        perm = torch.tensor(self.perm)
        flip = torch.tensor(self.flip)
        if to_input:  # canonical axis k -> input axis perm[k]
            n = torch.tensor(self.in_shape, dtype=b.dtype)[perm]
            lo, hi = b[:, :d], b[:, d:]
            lo2 = torch.where(flip, n - hi, lo)
            hi2 = torch.where(flip, n - lo, hi)
            out = torch.empty_like(b)
            out[:, perm] = lo2
            out[:, d + perm] = hi2
            return out
        n = torch.tensor(self.in_shape, dtype=b.dtype)[perm]  # input axis perm[k] -> canonical axis k
        lo, hi = b[:, perm], b[:, d + perm]
        return torch.cat([torch.where(flip, n - hi, lo), torch.where(flip, n - lo, hi)], 1)

    def boxes_to_input(self, boxes):
        """Boxes ``[N, 2d]`` (array order, edge coordinates) on the canonical grid -> the same boxes on the input
        grid (torch in, torch out; NaN rows stay NaN)."""
        return self._map(boxes, to_input=True)

    def boxes_to_canonical(self, boxes):
        """Boxes ``[N, 2d]`` on the input grid -> the same boxes on the canonical grid."""
        return self._map(boxes, to_input=False)


def canonical_orientation(geometry: Geometry, shape: Sequence[int]) -> Reorientation:
    """The permutation and reversals that bring an image of ``geometry`` and spatial ``shape`` to the canonical
    layout (see the module docstring)."""
    d = geometry.ndim
    D = np.asarray(geometry.direction, dtype=np.float64).reshape(d, d)  # rows: world axes, columns: ITK index axes
    best = max(itertools.permutations(range(d)), key=lambda s: sum(abs(D[s[a], a]) for a in range(d)))
    perm, flip = [0] * d, [False] * d
    for a in range(d):  # ITK index axis a -> world axis best[a]; numpy axis of ITK axis a is d - 1 - a
        k = d - 1 - best[a]
        perm[k] = d - 1 - a
        flip[k] = bool(D[best[a], a] < 0)
    return Reorientation(tuple(perm), tuple(flip), tuple(int(s) for s in shape))


def to_canonical(image: MedicalImage) -> tuple[MedicalImage, Reorientation]:
    """``image`` in the canonical layout (the same physical image: geometry updated, no resampling) and the
    :class:`Reorientation` that maps boxes back. An image already canonical is returned as is."""
    g = image.geometry
    d = g.ndim
    ro = canonical_orientation(g, image.array.shape[1:])
    if ro.is_identity:
        return image, ro
    D = np.asarray(g.direction, dtype=np.float64).reshape(d, d)
    sp_itk = np.asarray(g.spacing[::-1], dtype=np.float64)  # spacing per ITK index axis
    idx0 = np.zeros(d)  # ITK index of the input voxel that becomes the canonical voxel 0
    D2 = np.zeros_like(D)
    for k in range(d):  # canonical numpy axis k = ITK axis d-1-k, taken from input numpy axis perm[k]
        a_old, a_new = d - 1 - ro.perm[k], d - 1 - k
        sign = -1.0 if ro.flip[k] else 1.0
        D2[:, a_new] = sign * D[:, a_old]
        if ro.flip[k]:
            idx0[a_old] = ro.in_shape[ro.perm[k]] - 1
    origin = np.asarray(g.origin, dtype=np.float64) + D @ (sp_itk * idx0)
    geom = Geometry(tuple(g.spacing[j] for j in ro.perm), tuple(origin.tolist()), tuple(D2.reshape(-1).tolist()))
    arr = np.ascontiguousarray(ro.array(image.array))
    return MedicalImage(arr, geom, dict(image.meta), image.path), ro
