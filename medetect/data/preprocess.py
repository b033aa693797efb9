"""The one way a raw image becomes a model's input: :func:`prepare` applies a stored
:class:`medetect.models.io.Preprocess` (intensity, resampling, resize) to a :class:`MedicalImage` and returns the
tensor together with the exact voxel mapping back to the input grid.

Order (the order the models were trained with): intensity first (a CT window clips Hounsfield units BEFORE the
linear interpolation, as LUNA training did), then resampling to ``spacing`` (:func:`medetect.data.transforms.resample`),
then the ``scale`` resize (:func:`medetect.data.transforms.scale`). Both geometric steps scale edge coordinates
exactly by ``zoom`` per axis, so a box ``b`` on the model grid is ``b / zoom`` on the input grid
(:meth:`Prepared.to_input`).

Intensity is one family (:func:`normalize_intensity`): ``window = [lo, hi]`` -> ``clip((x - lo) / (hi - lo), 0, 1)``,
else ``(x / max_value - mean) / std``. ``transforms.Normalize``/``HUWindow`` and ``luna.LunaPreprocess`` are
thin users of it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch

from ..convert import Geometry
from ..models.io import Preprocess
from .image import MedicalImage
from .transforms import normalize_intensity, resample, scale, window_intensity

__all__ = ["RANGE_REFUSE_FACTOR", "Prepared", "check_input", "normalize_intensity", "prepare", "window_intensity"]

RANGE_REFUSE_FACTOR = 4.0  # values further than 4 range-widths outside the training range: refused, not warned


@dataclasses.dataclass
class Prepared:
    """A model-ready tensor ``[C, *S']`` and how it maps back: ``zoom[a]`` model voxels per input voxel on axis
    ``a``; ``input_shape`` and ``geometry`` are the INPUT image's."""

    tensor: torch.Tensor
    zoom: tuple[float, ...]
    input_shape: tuple[int, ...]
    geometry: Geometry

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``[N, 2d]`` on the model grid -> float64 boxes on the input grid (exact inverse, clipped)."""
        b = boxes.double() / torch.tensor(self.zoom * 2, dtype=torch.float64)
        hi = torch.tensor(self.input_shape * 2, dtype=torch.float64)
        return torch.minimum(b.clamp(min=0), hi)


def _what(image: MedicalImage) -> str:
    return image.path if image.path is not None else "<in-memory image>"


def check_input(image: MedicalImage, pre: Preprocess, *, allow_range_mismatch: bool = False) -> None:
    """Refuse (``ValueError``) an input the model cannot read: wrong dimensionality, wrong channel count, values far
    outside the training range; warn when values are outside it. ``allow_range_mismatch`` turns the range refusal
    and warning off."""
    where = _what(image)
    d = image.geometry.ndim
    if d != pre.ndim:
        kind = {2: "a 2D image", 3: "a 3D volume"}.get(d, f"a {d}D image")
        raise ValueError(f"{where}: the model takes {pre.ndim}D inputs but this is {kind}; use a {d}D model for it")
    _check_range(image, pre, allow_range_mismatch)
    c = image.array.shape[0]
    if c == 1 and pre.channels > 1:
        warnings.warn(f"{where}: a one-channel image, repeated across the model's {pre.channels} channels", stacklevel=2)
    elif c != pre.channels:
        raise ValueError(f"{where}: image has {c} channels, the model expects {pre.channels}")


def _check_range(image: MedicalImage, pre: Preprocess, allow_range_mismatch: bool) -> None:
    """Values far outside the training range: refused; outside it: a warning (see :func:`check_input`)."""
    where = _what(image)
    if pre.value_range is None or allow_range_mismatch:
        return
    lo, hi = pre.value_range
    a = image.array
    amin, amax = float(a.min()), float(a.max())  # one pass per input, not in a hot loop
    width = hi - lo
    trained = f"{pre.bit_depth}-bit " if pre.bit_depth else ""
    msg = (f"{where}: values span [{amin:g}, {amax:g}] ({a.dtype}) but the model was trained on {trained}inputs in "
           f"[{lo:g}, {hi:g}]")
    if amax > hi + RANGE_REFUSE_FACTOR * width or amin < lo - RANGE_REFUSE_FACTOR * width:
        raise ValueError(msg + "; convert the image or pass allow_range_mismatch (--allow-range-mismatch) to predict anyway")
    if amax > hi or amin < lo:
        warnings.warn(msg + "; predictions may be unreliable", stacklevel=2)


def prepare(image: MedicalImage, pre: Preprocess, *, allow_range_mismatch: bool = False) -> Prepared:
    """``image`` -> :class:`Prepared` (checks with :func:`check_input`, then intensity, resampling, resize)."""
    check_input(image, pre, allow_range_mismatch=allow_range_mismatch)
    arr = image.array if image.array.flags.writeable else image.array.copy()  # torch cannot wrap read-only arrays
    if arr.shape[0] == 1 and pre.channels > 1:  # a grey image for a colour model (check_input warned)
        arr = np.repeat(arr, pre.channels, axis=0)
    t = torch.from_numpy(np.ascontiguousarray(arr)) if arr.dtype not in (np.uint16, np.uint32, np.uint64) else \
        torch.from_numpy(arr.astype(np.float32))
    if pre.window is not None:
        x = window_intensity(t, pre.window[0], pre.window[1])  # a new float32 tensor: the caller's array is untouched
    else:
        x = normalize_intensity(t, pre.max_value, pre.mean, pre.std)
    geom = image.geometry
    shape = tuple(int(n) for n in arr.shape[1:])
    zoom = [1.0] * len(shape)
    if pre.spacing is not None:
        z = [o / s for o, s in zip(geom.spacing, pre.spacing)]
        if any(v != 1.0 for v in z):
            x = resample({"image": x, "spacing": tuple(geom.spacing)}, tuple(pre.spacing))["image"]
            zoom = z
    if pre.scale != 1.0:
        x = scale({"image": x}, pre.scale)["image"]
        zoom = [v * pre.scale for v in zoom]
    if not all(math.isfinite(v) and v > 0 for v in zoom):
        raise ValueError(f"{_what(image)}: invalid spacing {geom.spacing} for resampling")
    return Prepared(tensor=x.contiguous(), zoom=tuple(zoom), input_shape=shape, geometry=geom)
