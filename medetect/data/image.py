"""The in-memory image every reader returns: a channels-first array plus its world geometry.

:class:`MedicalImage` is deliberately thin: it holds what a detector needs to turn voxel boxes into world
coordinates and back (``geometry``, see :mod:`medetect.convert`), the pixel data in its native dtype, and a free-form
``meta`` dict with whatever the source format told us (modality, window presets, UIDs, kernel, photometric
interpretation, ...). Conversion to float happens only in :meth:`MedicalImage.to_tensor`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..convert import Geometry

__all__ = ["MedicalImage", "MedicalImageError"]


class MedicalImageError(ValueError):
    """A file (or an in-memory image) cannot be turned into a valid :class:`MedicalImage`.

    Every message names the file (or ``<in-memory image>``) and says what is wrong with it.
    """


# numpy dtypes that torch.from_numpy cannot take directly, and the dtype they are widened to first (losslessly
# where possible: uint64 has no lossless torch counterpart and goes through float64).
_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.float64}


def _where(path: str | None) -> str:
    return repr(path) if path is not None else "<in-memory image>"


@dataclass(eq=False)
class MedicalImage:
    """A 2D or 3D medical image.

    Attributes:
        array: pixel data, channels first ``[C, *spatial]`` in array-axis order (``[C, y, x]`` or ``[C, z, y, x]``).
            The dtype is the one the file stores after its own value transform (e.g. DICOM rescale): int16 HU stay
            int16, 8-bit PNG stays uint8, a 16-bit PNG stays uint16. Readers never normalise intensities.
        geometry: :class:`medetect.convert.Geometry` (spacing per array axis, world origin ``(x, y, z)`` of voxel 0's
            centre, ITK direction). Plain pictures get :meth:`Geometry.identity` (1 px spacing).
        meta: free-form metadata from the source (``format``, ``modality``, ``photometric``, ``windows``,
            ``patient_id``, ``series_uid``, ``kernel``, ...). Keys are documented by each reader.
        path: the file (or folder, for a DICOM series) the image was read from, or ``None``.

    Validation: ``array.ndim`` must equal ``1 + geometry.ndim`` (channel axis plus one axis per spatial dim) and no
    axis may be empty; otherwise :class:`MedicalImageError` naming ``path``.
    """

    array: np.ndarray
    geometry: Geometry
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, str):
            self.path = os.fspath(self.path) if isinstance(self.path, os.PathLike) else str(self.path)
        where = _where(self.path)
        if isinstance(self.array, torch.Tensor):
            self.array = self.array.detach().cpu().numpy()
        elif not isinstance(self.array, np.ndarray):
            self.array = np.asarray(self.array)
        if not isinstance(self.geometry, Geometry):
            raise MedicalImageError(
                f"{where}: geometry must be a medetect.convert.Geometry, got {type(self.geometry).__name__}"
            )
        if self.array.ndim != 1 + self.geometry.ndim:
            raise MedicalImageError(
                f"{where}: array must be channels-first [C, *spatial] with {self.geometry.ndim} spatial axes "
                f"(ndim {1 + self.geometry.ndim}) to match its {self.geometry.ndim}D geometry, got shape "
                f"{tuple(self.array.shape)}"
            )
        if 0 in self.array.shape:
            raise MedicalImageError(f"{where}: array has an empty axis, shape {tuple(self.array.shape)}")
        if self.meta is None:
            self.meta = {}

    # ------------------------------------------------------------------ properties

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3), i.e. without the channel axis."""
        return self.geometry.ndim

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis, array order (``(y, x)`` or ``(z, y, x)``)."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per array axis (``(z, y, x)`` / ``(y, x)``); 1.0 for plain pictures."""
        return self.geometry.spacing

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    # ------------------------------------------------------------------ conversion

    def to_tensor(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The array as a ``[C, *spatial]`` CPU tensor of ``dtype`` (values unchanged, no normalisation).

        ``dtype=None`` keeps the native dtype where torch has one; uint16/uint32 (which torch cannot take from
        numpy) are widened to int32/int64, uint64 to float64. The result never shares memory with ``array`` when a
        conversion happens; with ``dtype=None`` on a supported dtype it may.
        """
        arr = self.array
        if arr.dtype in _WIDEN:
            arr = arr.astype(_WIDEN[arr.dtype])
        elif not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t if dtype is None else t.to(dtype)

    def __repr__(self) -> str:  # the default dataclass repr would print the whole array
        g = self.geometry
        return (
            f"MedicalImage(shape={tuple(self.array.shape)}, dtype={self.array.dtype}, spacing={g.spacing}, "
            f"origin={g.origin}, path={self.path!r}, meta_keys={sorted(self.meta)})"
        )
