"""Sample-dict transforms for 2D and 3D detection: geometry (resample, crop, pad, flip, rot90, zoom) and intensity.

Every transform is written once for any number ``d`` of spatial dimensions.

Sample
------
A sample is a ``dict``:

* ``"image"``: tensor ``[C, *spatial]`` (``d = image.dim() - 1``), float for anything that interpolates;
* ``"boxes"``: float tensor ``[N, 2d]`` in the medetect convention (array-axis order, voxel edge units, half-open,
  voxel ``i`` covers ``[i, i + 1)``);
* ``"labels"``: long tensor ``[N]``;
* ``"spacing"``: tuple of ``d`` floats, millimetres per ARRAY axis (same order as the boxes);
* optional ``"box_ids"``: long tensor ``[N]`` naming the original annotation of each box;
* anything else is passed through untouched (a segmentation mask under another key is NOT transformed: put it in an
  image channel if it has to follow the geometry).

Only ``"boxes"``, ``"labels"`` and ``"box_ids"`` (:data:`PER_BOX_KEYS`) are treated as per-box and filtered when boxes
are dropped. ``"boxes"``/``"labels"``/``"spacing"`` may be absent (image-only samples); :func:`resample` needs
``"spacing"``. Functions never modify the sample they are given: they return a new ``dict`` (a shallow copy with the
changed entries replaced).

Every transform class takes its settings as keyword-only constructor arguments and is called as
``t(sample, generator=None)``. All randomness comes from ``generator`` (a CPU ``torch.Generator``) or, when it is
``None``, from torch's global RNG, so a seed makes every pipeline reproducible; the classes are plain picklable objects,
usable in ``DataLoader`` worker processes.

Geometry and the edge convention
--------------------------------
* Flip of axis ``a`` of size ``n``: a point at edge coordinate ``p`` goes to ``n - p``, so a box
  ``[lo, hi)`` becomes ``[n - hi, n - lo)``. Exact.
* ``rot90`` (``torch.rot90`` semantics, rotation from the first axis towards the second, ``k = 1``):
  ``out[i, j] = in[j, n_b - 1 - i]``, i.e. in edge coordinates ``(p_a, p_b) -> (n_b - p_b, p_a)``. Boxes are
  permuted/mirrored exactly and, for odd ``k``, the two spacings are swapped (the physical size of every voxel is kept).
* Resampling (:func:`resample`, :func:`scale`) uses the sampling rule of ``torch.nn.functional.interpolate`` with
  ``align_corners=False``: output voxel ``j`` takes the value at input *centre* coordinate
  ``(j + 0.5) * r - 0.5`` with ``r = new_spacing / old_spacing`` (input voxels per output voxel). In EDGE coordinates
  (``e = x + 0.5``) this is ``e_in = r * e_out``: a pure scale, with no half-voxel shift, so a box is scaled by
  ``old_spacing / new_spacing`` exactly and both grids keep the same lo edge (the same physical corner). With
  ``align_corners=True`` the corner voxel CENTRES would be pinned instead, which is an affine map with a shift and a
  factor ``(n - 1) / (m - 1)`` that is neither the spacing ratio nor consistent with the edge convention.
  The output size is ``m = floor(n * old / new + 0.5)`` (round half up, at least 1), and the spacing becomes exactly
  ``new``. Because ``m`` is rounded, ``m * new`` may differ from ``n * old`` by up to half an output voxel: the last
  output voxel may sample up to half a voxel past the input's end (clamped to the border, as ``interpolate`` does, so
  a mask touching the end may gain that voxel) or the grid may end just short of it. ``interpolate`` itself cannot
  take both a size and the exact scale, so the resampling is done separably, one axis at a time, with the same
  formulas (``"linear"``: 2-tap interpolation with the source index clamped to ``[0, n - 1]``, the product over axes
  is bi-/tri-linear; ``"nearest"``: ``floor((j + 0.5) * r)``, ``interpolate``'s ``"nearest-exact"``; torch's legacy
  ``"nearest"`` is off by half a voxel and is not used). On the voxels both produce, the result matches
  ``interpolate(..., scale_factor=old/new, recompute_scale_factor=False, align_corners=False)`` (tested). After
  resampling, boxes are clipped to the new image
  extent ``[0, m]`` (this only trims the sliver of at most half a voxel that the rounded grid does not cover).

Crops and the VISIBILITY RULE
-----------------------------
:func:`crop` takes the window ``[lo, lo + size)`` on integer voxels (any part outside the image is padded with a
constant) and shifts the boxes by ``-lo``. Then every box is clipped to the window and

* it is KEPT if ``visibility >= min_visibility`` and ``visibility > 0``, where ``visibility`` = volume of the clipped
  box / volume of the original box, AND on every axis its clipped extent is ``>= min(min_size, original extent)``
  (so ``min_size`` never drops a box that was fully visible, however thin; it only drops slivers);
* otherwise it is DROPPED.

Defaults: ``min_visibility = 0.5`` (at least half of an object must be in the patch to count as a target; a box
exactly half outside is kept), ``min_size = 1.0`` voxel. A degenerate box (zero extent on some axis) has visibility 1 if
it lies inside the closed window and 0 otherwise. Nothing is lost silently: a crop gives every box a ``"box_ids"`` entry
(``arange(N)``, the box's position in the incoming sample, when the sample had none) and appends the ids of the dropped
boxes to ``"dropped_box_ids"`` (a long tensor, always present after a crop, possibly empty). Kept boxes are clipped to
the window.

Positive-aware crops
--------------------
:class:`RandomCrop` chooses, with probability ``pos_prob`` (and only when the sample has boxes), a *positive* patch:
a box is chosen uniformly at random, and on each axis the integer crop origin is drawn uniformly among

* the origins whose window contains the WHOLE box, when the box fits in the window on that axis, otherwise
* the origins whose window contains the box CENTRE,

both restricted to the origins a uniform crop could take (``[min(0, n - s), max(0, n - s)]``: the window does not
leave the image unless the image is smaller than the window). Otherwise the origin is uniform in that range. A box that
fits the patch therefore always survives a positive crop with visibility 1; a box larger than the patch keeps its centre
in the patch and is then subject to the visibility rule like any other.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

__all__ = [
    "PER_BOX_KEYS",
    "Transform",
    "Compose",
    "ToFloat",
    "Resample",
    "ScaleIntensityRange",
    "HUWindow",
    "Normalize",
    "normalize_intensity",
    "window_intensity",
    "CropOrPad",
    "RandomCrop",
    "RandomFlip",
    "RandomRot90",
    "RandomScale",
    "RandomIntensity",
    "flip",
    "rot90",
    "resample",
    "scale",
    "crop",
    "pad",
    "pad_to",
    "box_visibility",
    "filter_boxes",
    "ensure_box_ids",
]

PER_BOX_KEYS = ("boxes", "labels", "box_ids")
"""Sample keys whose first dimension indexes boxes; they are filtered together when boxes are dropped."""

_MODES = ("nearest", "linear")


# --------------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------------


def _prepare(sample: Any) -> tuple[dict, int]:
    """Validate a sample and return ``(shallow copy, d)``; boxes are made floating point."""
    if not isinstance(sample, Mapping):
        raise ValueError(f"sample must be a dict with an 'image' entry, got {type(sample).__name__}")
    if "image" not in sample:
        raise ValueError("sample must have an 'image' entry (tensor [C, *spatial])")
    image = sample["image"]
    if not isinstance(image, torch.Tensor) or image.dim() < 2:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"sample['image'] must be a tensor [C, *spatial] with at least one spatial axis, got {shape}")
    d = image.dim() - 1
    out = dict(sample)
    n = None
    if "boxes" in out:
        boxes = out["boxes"]
        if not isinstance(boxes, torch.Tensor):
            boxes = torch.as_tensor(boxes, dtype=torch.float32)
        if boxes.numel() == 0 and boxes.dim() != 2:
            boxes = boxes.reshape(0, 2 * d)
        if boxes.dim() != 2 or boxes.shape[1] != 2 * d:
            raise ValueError(
                f"sample['boxes'] must have shape [N, {2 * d}] for a {d}D image (lo_1..lo_{d}, hi_1..hi_{d}), "
                f"got {tuple(boxes.shape)}"
            )
        if not boxes.is_floating_point():
            boxes = boxes.float()
        out["boxes"] = boxes
        n = boxes.shape[0]
    for key in ("labels", "box_ids"):
        if key in out:
            v = out[key]
            if not isinstance(v, torch.Tensor):
                v = torch.as_tensor(v, dtype=torch.long)
                out[key] = v
            if v.dim() != 1 or (n is not None and v.shape[0] != n):
                want = f"[{n}] (one per box)" if n is not None else "[N]"
                raise ValueError(f"sample['{key}'] must have shape {want}, got {tuple(v.shape)}")
    if out.get("spacing") is not None:
        sp = out["spacing"]
        sp = tuple(float(s) for s in (sp.tolist() if isinstance(sp, torch.Tensor) else sp))
        if len(sp) != d or not all(math.isfinite(s) and s > 0 for s in sp):
            raise ValueError(f"sample['spacing'] must be {d} positive finite floats (one per array axis), got {sp}")
        out["spacing"] = sp
    return out, d


def _check_prob(p: Any, name: str) -> float:
    if not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _per_axis(value: Any, d: int, name: str, *, integer: bool = False, positive: bool = False,
              nonneg: bool = False) -> tuple:
    """A scalar broadcast to ``d`` axes, or a sequence of exactly ``d`` numbers."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,) * d
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != d:
        raise ValueError(f"{name} must be a number or a sequence of {d} numbers (one per spatial axis), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must contain finite numbers, got {value!r}")
        if integer:
            if float(v) != int(v):
                raise ValueError(f"{name} must contain integers, got {value!r}")
            v = int(v)
        else:
            v = float(v)
        if positive and v <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        if nonneg and v < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
        out.append(v)
    return tuple(out)


def _check_size_arg(size: Any, name: str) -> Any:
    """Constructor-time check of a size that is broadcast later (int or sequence of positive ints)."""
    vals = size.tolist() if isinstance(size, torch.Tensor) else size
    vals = [vals] if isinstance(vals, numbers.Real) else vals
    if isinstance(vals, str) or not isinstance(vals, Sequence) or len(vals) == 0 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in vals
    ):
        raise ValueError(f"{name} must be a positive int or a sequence of positive ints, got {size!r}")
    return tuple(vals) if isinstance(size, Sequence) else size


def _check_range(r: Any, name: str, *, positive: bool = False) -> tuple[float, float] | None:
    if r is None:
        return None
    if not isinstance(r, Sequence) or len(r) != 2 or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)) for v in r
    ):
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers or None, got {r!r}")
    lo, hi = float(r[0]), float(r[1])
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {r!r}")
    if positive and lo <= 0:
        raise ValueError(f"{name} must be positive, got {r!r}")
    return lo, hi


def _check_axes(axes: Any, d: int, name: str) -> tuple[int, ...]:
    if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
        axes = (axes,)
    if not isinstance(axes, Sequence) or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
    ):
        raise ValueError(f"{name} must be an int or a sequence of ints (spatial axes), got {axes!r}")
    if not all(-d <= a < d for a in axes):
        raise ValueError(f"{name} must be spatial axes in [{-d}, {d - 1}] for a {d}D image, got {tuple(axes)}")
    norm = tuple(int(a) % d for a in axes)
    if len(set(norm)) != len(norm):
        raise ValueError(f"{name} must not repeat an axis, got {tuple(axes)}")
    return norm


def _static_axes(axes: Any, name: str) -> tuple[int, ...]:
    """Constructor-time check of spatial axes (range is checked at call time, when d is known)."""
    if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
        axes = (axes,)
    if not isinstance(axes, Sequence) or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool)
                                                 for a in axes):
        raise ValueError(f"{name} must be an int or a sequence of ints (spatial axes), got {axes!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name} must not repeat an axis, got {tuple(axes)}")
    return tuple(int(a) for a in axes)


def _check_mode(mode: Any) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _check_visibility_args(min_visibility: Any, min_size: Any) -> tuple[float, float]:
    mv = _check_prob(min_visibility, "min_visibility")
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Real) or not float(min_size) >= 0:
        raise ValueError(f"min_size must be a non-negative number of voxels, got {min_size!r}")
    return mv, float(min_size)


def _check_pad_value(value: Any, name: str) -> Any:
    if isinstance(value, str):
        if value != "min":
            raise ValueError(f"{name} must be a number or 'min' (the image minimum), got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number or 'min' (the image minimum), got {value!r}")
    return float(value)


def _resolve_pad_value(image: torch.Tensor, value: Any) -> float:
    if value == "min":
        return float(image.amin()) if image.numel() else 0.0
    return value


# --------------------------------------------------------------------------------------------------------------------
# box bookkeeping
# --------------------------------------------------------------------------------------------------------------------


def ensure_box_ids(sample: Mapping) -> dict:
    """Return a copy of ``sample`` with ``"box_ids"`` (``arange(N)`` when it had none)."""
    out, _ = _prepare(sample)
    if "boxes" in out and "box_ids" not in out:
        out["box_ids"] = torch.arange(out["boxes"].shape[0], device=out["boxes"].device)
    return out


def box_visibility(boxes: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``boxes [N, 2d]`` to the window ``[0, shape)`` and measure how much of each is inside.

    Returns ``(clipped [N, 2d], visibility [N])``; visibility is clipped volume / volume, and for a degenerate box (zero
    extent on some axis) 1 when it lies inside the closed window, else 0.
    """
    d = boxes.shape[-1] // 2
    upper = torch.as_tensor(shape, dtype=boxes.dtype, device=boxes.device)
    lo, hi = boxes[:, :d], boxes[:, d:]
    clo = torch.minimum(lo.clamp(min=0), upper)
    chi = torch.minimum(hi.clamp(min=0), upper)
    chi = torch.maximum(chi, clo)
    vol = (hi - lo).clamp(min=0).prod(-1)
    cvol = (chi - clo).prod(-1)
    inside = ((lo >= 0) & (hi <= upper) & (lo <= hi)).all(-1)
    vis = torch.where(vol > 0, cvol / vol.clamp(min=torch.finfo(boxes.dtype).tiny), inside.to(boxes.dtype))
    return torch.cat([clo, chi], dim=-1), vis


def filter_boxes(sample: Mapping, *, min_visibility: float = 0.5, min_size: float = 1.0) -> dict:
    """Apply the VISIBILITY RULE (module docstring) to ``sample["boxes"]`` against the extent of ``sample["image"]``.

    Kept boxes are clipped; ``"box_ids"`` is created if missing; dropped ids are appended to ``"dropped_box_ids"``.
    """
    min_visibility, min_size = _check_visibility_args(min_visibility, min_size)
    out, d = _prepare(sample)
    if "boxes" not in out:
        return out
    boxes = out["boxes"]
    if "box_ids" not in out:
        out["box_ids"] = torch.arange(boxes.shape[0], device=boxes.device)
    clipped, vis = box_visibility(boxes, out["image"].shape[1:])
    ext = boxes[:, d:] - boxes[:, :d]
    cext = clipped[:, d:] - clipped[:, :d]
    size_ok = (cext >= torch.clamp(ext, max=min_size)).all(-1)
    keep = (vis > 0) & (vis >= min_visibility) & size_ok
    prev = out.get("dropped_box_ids")
    prev = torch.zeros(0, dtype=torch.long, device=boxes.device) if prev is None else torch.as_tensor(prev)
    out["dropped_box_ids"] = torch.cat([prev.to(boxes.device).long(), out["box_ids"][~keep].long()])
    out["boxes"] = clipped
    for key in PER_BOX_KEYS:
        if key in out:
            out[key] = out[key][keep]
    return out


# --------------------------------------------------------------------------------------------------------------------
# functional geometry
# --------------------------------------------------------------------------------------------------------------------


def flip(sample: Mapping, axes: int | Sequence[int]) -> dict:
    """Mirror the spatial ``axes`` (0-based spatial axes, negatives allowed): box ``[lo, hi) -> [n - hi, n - lo)``."""
    out, d = _prepare(sample)
    axes = _check_axes(axes, d, "axes")
    if not axes:
        return out
    image = out["image"]
    out["image"] = image.flip([a + 1 for a in axes])
    if "boxes" in out:
        boxes = out["boxes"].clone()
        ax = torch.tensor(axes, device=boxes.device)
        n = torch.tensor([image.shape[a + 1] for a in axes], dtype=boxes.dtype, device=boxes.device)
        lo, hi = out["boxes"][:, ax], out["boxes"][:, ax + d]
        boxes[:, ax] = n - hi
        boxes[:, ax + d] = n - lo
        out["boxes"] = boxes
    return out


def rot90(sample: Mapping, k: int = 1, axes: Sequence[int] = (-2, -1)) -> dict:
    """Rotate by ``k * 90`` degrees in the plane of two spatial ``axes`` (``torch.rot90`` direction: from the first
    axis towards the second). Boxes are permuted/mirrored exactly; for odd ``k`` the two spacings are swapped."""
    out, d = _prepare(sample)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int (number of quarter turns), got {k!r}")
    if d < 2:
        raise ValueError(f"axes: rot90 needs at least 2 spatial axes, the image has {d}")
    if not isinstance(axes, Sequence) or len(axes) != 2:
        raise ValueError(f"axes must be a pair of distinct spatial axes, got {axes!r}")
    a, b = _check_axes(axes, d, "axes")
    k = int(k) % 4
    if k == 0:
        return out
    image = out["image"]
    out["image"] = torch.rot90(image, k, dims=(a + 1, b + 1))
    if "boxes" in out:
        boxes = out["boxes"]
        shape = list(image.shape[1:])
        for _ in range(k):  # at most 3 quarter turns, each one vectorised over all boxes
            n_b = shape[b]
            new = boxes.clone()
            new[:, a], new[:, a + d] = n_b - boxes[:, b + d], n_b - boxes[:, b]
            new[:, b], new[:, b + d] = boxes[:, a], boxes[:, a + d]
            boxes = new
            shape[a], shape[b] = shape[b], shape[a]
        out["boxes"] = boxes
    if k % 2 == 1 and out.get("spacing") is not None:
        sp = list(out["spacing"])
        sp[a], sp[b] = sp[b], sp[a]
        out["spacing"] = tuple(sp)
    return out


def _resample_image(image: torch.Tensor, out_shape: Sequence[int], ratios: Sequence[float], mode: str) -> torch.Tensor:
    """Separable align_corners=False resampling; ``ratios[a]`` = input edge units per output edge unit."""
    if mode == "linear" and not image.is_floating_point():
        raise ValueError(
            f"sample['image'] must be floating point for mode='linear' (got {image.dtype}); apply ToFloat first"
        )
    out = image
    for a, (m, r) in enumerate(zip(out_shape, ratios)):
        n = out.shape[a + 1]
        if m == n and r == 1.0:
            continue
        centre = (torch.arange(m, dtype=torch.float64, device=image.device) + 0.5) * r  # input edge coordinate
        if mode == "nearest":
            out = out.index_select(a + 1, centre.floor().long().clamp(0, n - 1))
            continue
        src = (centre - 0.5).clamp(0, n - 1)  # input centre coordinate, clamped like interpolate
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).to(out.dtype).view([m] + [1] * (out.dim() - a - 2))
        x0 = out.index_select(a + 1, i0)
        x1 = out.index_select(a + 1, i1)
        out = x0 + w * (x1 - x0)
    return out


def _zoom(out: dict, zoom: Sequence[float], mode: str) -> dict:
    """Scale the sample by ``zoom[a]`` (output voxels per input voxel) on each axis; ``out`` is already a copy."""
    image = out["image"]
    in_shape = image.shape[1:]
    out_shape = [max(1, math.floor(n * z + 0.5)) for n, z in zip(in_shape, zoom)]
    out["image"] = _resample_image(image, out_shape, [1.0 / z for z in zoom], mode)
    if "boxes" in out:
        boxes = out["boxes"]
        f = torch.tensor(list(zoom) * 2, dtype=torch.float64, device=boxes.device)
        upper = torch.tensor(out_shape * 2, dtype=torch.float64, device=boxes.device)
        out["boxes"] = torch.minimum((boxes.double() * f).clamp(min=0), upper).to(boxes.dtype)
    if out.get("spacing") is not None:
        out["spacing"] = tuple(s / z for s, z in zip(out["spacing"], zoom))
    return out


def resample(sample: Mapping, target_spacing: float | Sequence[float], *, mode: str = "linear") -> dict:
    """Resample to ``target_spacing`` (mm per array axis; a number means isotropic). Output size
    ``floor(n * old / new + 0.5)``, boxes scaled by ``old / new`` exactly, spacing set to the target (module docstring).
    """
    mode = _check_mode(mode)
    out, d = _prepare(sample)
    target = _per_axis(target_spacing, d, "target_spacing", positive=True)
    if out.get("spacing") is None:
        raise ValueError("sample['spacing'] is required by resample (mm per array axis)")
    old = out["spacing"]
    out = _zoom(out, [o / t for o, t in zip(old, target)], mode)
    out["spacing"] = target
    return out


def scale(sample: Mapping, factor: float | Sequence[float], *, mode: str = "linear") -> dict:
    """Zoom the image by ``factor`` (per axis or one number): output size ``floor(n * factor + 0.5)``, boxes multiplied
    by ``factor`` exactly, spacing (if present) divided by ``factor`` so that millimetre sizes stay true."""
    mode = _check_mode(mode)
    out, d = _prepare(sample)
    factor = _per_axis(factor, d, "factor", positive=True)
    return _zoom(out, factor, mode)


def _window(image: torch.Tensor, lo: Sequence[int], size: Sequence[int], value: float) -> torch.Tensor:
    """``image[:, lo:lo+size]`` with out-of-image voxels set to ``value``."""
    shape = image.shape[1:]
    src = tuple(slice(max(l, 0), min(l + s, n)) for l, s, n in zip(lo, size, shape))
    if all(l >= 0 and l + s <= n for l, s, n in zip(lo, size, shape)):
        return image[(slice(None),) + src].clone()
    out = image.new_full((image.shape[0], *size), value)
    if all(sl.stop > sl.start for sl in src):
        dst = tuple(slice(sl.start - l, sl.stop - l) for sl, l in zip(src, lo))
        out[(slice(None),) + dst] = image[(slice(None),) + src]
    return out


def _shift_boxes(out: dict, lo: Sequence[int]) -> None:
    if "boxes" in out:
        boxes = out["boxes"]
        out["boxes"] = boxes - torch.tensor(list(lo) * 2, dtype=boxes.dtype, device=boxes.device)


def crop(sample: Mapping, lo: int | Sequence[int], size: int | Sequence[int], *, pad_value: float | str = 0.0,
         min_visibility: float = 0.5, min_size: float = 1.0) -> dict:
    """Take the window ``[lo, lo + size)`` (integer voxels; it may extend past the image, which is padded with
    ``pad_value``, a number or ``"min"``), shift the boxes by ``-lo`` and apply the VISIBILITY RULE."""
    out, d = _prepare(sample)
    lo = _per_axis(lo, d, "lo", integer=True)
    size = _per_axis(size, d, "size", integer=True, positive=True)
    pad_value = _check_pad_value(pad_value, "pad_value")
    min_visibility, min_size = _check_visibility_args(min_visibility, min_size)
    out["image"] = _window(out["image"], lo, size, _resolve_pad_value(out["image"], pad_value))
    _shift_boxes(out, lo)
    return filter_boxes(out, min_visibility=min_visibility, min_size=min_size)


def pad(sample: Mapping, before: int | Sequence[int], after: int | Sequence[int] | None = None, *,
        value: float | str = 0.0) -> dict:
    """Pad ``before`` / ``after`` voxels on each axis (``after`` defaults to ``before``) with ``value`` (a number or
    ``"min"``); boxes are shifted by ``before``. No box is ever dropped."""
    out, d = _prepare(sample)
    before = _per_axis(before, d, "before", integer=True, nonneg=True)
    after = before if after is None else _per_axis(after, d, "after", integer=True, nonneg=True)
    value = _check_pad_value(value, "value")
    image = out["image"]
    size = [n + b + a for n, b, a in zip(image.shape[1:], before, after)]
    lo = [-b for b in before]
    out["image"] = _window(image, lo, size, _resolve_pad_value(image, value))
    _shift_boxes(out, lo)
    return out


def pad_to(sample: Mapping, size: int | Sequence[int], *, value: float | str = 0.0, center: bool = True) -> dict:
    """Pad every axis shorter than ``size`` up to ``size`` (never crops). ``center=True`` splits the padding (the odd
    voxel goes after), ``center=False`` pads at the end only."""
    out, d = _prepare(sample)
    size = _per_axis(size, d, "size", integer=True, positive=True)
    deficit = [max(s - n, 0) for s, n in zip(size, out["image"].shape[1:])]
    before = [df // 2 if center else 0 for df in deficit]
    return pad(out, before, [df - b for df, b in zip(deficit, before)], value=value)


# --------------------------------------------------------------------------------------------------------------------
# transform classes
# --------------------------------------------------------------------------------------------------------------------


def _rand(generator: torch.Generator | None, n: int = 1) -> torch.Tensor:
    """``n`` uniform float64 numbers in [0, 1) on the CPU from ``generator`` (or the global RNG)."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _uniform(lo: float, hi: float, generator: torch.Generator | None, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * _rand(generator, n)


def _randint(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform integers in ``[a, b]`` (inclusive), elementwise; ``a <= b``."""
    u = _rand(generator, a.numel())
    return torch.minimum(a + (u * (b - a + 1).double()).floor().long(), b)


class Transform:
    """Base class: keyword-only settings in ``__init__``, ``__call__(sample, generator=None) -> sample``."""

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply ``transforms`` in order, passing the same ``generator`` to each."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence) or not all(
            callable(t) for t in transforms
        ):
            raise ValueError(f"transforms must be a sequence of callables, got {transforms!r}")
        self.transforms = list(transforms)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        for t in self.transforms:
            sample = t(sample, generator)
        return dict(sample)

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {t!r}" for t in self.transforms)
        return f"Compose([\n{inner}\n])"


class ToFloat(Transform):
    """Cast the image to ``dtype`` (default float32) and the boxes to float32."""

    def __init__(self, *, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, _ = _prepare(sample)
        out["image"] = out["image"].to(self.dtype)
        if "boxes" in out:
            out["boxes"] = out["boxes"].float()
        return out


class Resample(Transform):
    """:func:`resample` to ``target_spacing`` (mm per array axis, or one number for isotropic)."""

    def __init__(self, *, target_spacing: float | Sequence[float], mode: str = "linear") -> None:
        if isinstance(target_spacing, numbers.Real) and not isinstance(target_spacing, bool):
            self.target_spacing = _per_axis(target_spacing, 1, "target_spacing", positive=True)[0]
        else:
            n = len(target_spacing) if isinstance(target_spacing, Sequence) else -1
            self.target_spacing = _per_axis(target_spacing, max(n, 1), "target_spacing", positive=True)
        self.mode = _check_mode(mode)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        return resample(sample, self.target_spacing, mode=self.mode)


# ------------------------------------------------------------------------------------ intensity: one family


def window_intensity(image: torch.Tensor, lo: float, hi: float, *, inplace: bool = False) -> torch.Tensor:
    """``clip((x - lo) / (hi - lo), 0, 1)`` (CT window). ``inplace`` reuses a float32 ``image`` (no copy)."""
    if not hi > lo:
        raise ValueError(f"the intensity window needs lo < hi, got [{lo}, {hi}]")
    x = image if (inplace and image.dtype == torch.float32) else image.float().clone()
    return x.sub_(lo).mul_(1.0 / (hi - lo)).clamp_(0.0, 1.0)


def normalize_intensity(image: torch.Tensor, max_value: float = 255.0, mean=(0.5,), std=(0.25,), *,
                        window: Sequence[float] | None = None) -> torch.Tensor:
    """The one intensity normalisation family, on ``[C, *S]``: with ``window`` the CT window
    (:func:`window_intensity`), else ``(image / max_value - mean) / std`` with per-channel or shared mean/std.
    Returns a new float tensor; the input is untouched."""
    if window is not None:
        return window_intensity(image, float(window[0]), float(window[1]))
    x = image.float() / max_value  # a new tensor: the in-place steps below never touch the input
    shape = (-1,) + (1,) * (x.ndim - 1)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    m = m.reshape(shape) if m.numel() > 1 else m
    s = s.reshape(shape) if s.numel() > 1 else s
    if torch.broadcast_shapes(x.shape, m.shape, s.shape) == x.shape:
        return x.sub_(m).div_(s)  # same values, two fewer full-size temporaries
    return (x - m) / s


class ScaleIntensityRange(Transform):
    """Map ``[a_min, a_max]`` linearly to ``[b_min, b_max]``; with ``clip`` the result is clipped to that range."""

    def __init__(self, *, a_min: float, a_max: float, b_min: float = 0.0, b_max: float = 1.0,
                 clip: bool = True) -> None:
        for name, v in (("a_min", a_min), ("a_max", a_max), ("b_min", b_min), ("b_max", b_max)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not float(a_max) > float(a_min):
            raise ValueError(f"a_max must be greater than a_min, got a_min={a_min!r}, a_max={a_max!r}")
        self.a_min, self.a_max, self.b_min, self.b_max = float(a_min), float(a_max), float(b_min), float(b_max)
        self.clip = bool(clip)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, _ = _prepare(sample)
        image = out["image"]
        if not image.is_floating_point():
            image = image.float()
        x = (image - self.a_min) * ((self.b_max - self.b_min) / (self.a_max - self.a_min)) + self.b_min
        if self.clip:
            x = x.clamp(min(self.b_min, self.b_max), max(self.b_min, self.b_max))
        out["image"] = x
        return out


class HUWindow(ScaleIntensityRange):
    """CT window: clip Hounsfield units to ``[lo, hi]`` and map them to ``[0, 1]`` (``HUWindow.lung()``: -1000..400)."""

    def __init__(self, *, lo: float, hi: float) -> None:
        if isinstance(lo, bool) or not isinstance(lo, numbers.Real) or not math.isfinite(float(lo)):
            raise ValueError(f"lo must be a finite number of HU, got {lo!r}")
        if isinstance(hi, bool) or not isinstance(hi, numbers.Real) or not math.isfinite(float(hi)):
            raise ValueError(f"hi must be a finite number of HU, got {hi!r}")
        if not float(hi) > float(lo):
            raise ValueError(f"hi must be greater than lo, got lo={lo!r}, hi={hi!r}")
        super().__init__(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, _ = _prepare(sample)
        image = out["image"]
        x = window_intensity(image, self.a_min, self.a_max)
        out["image"] = x.to(image.dtype) if image.is_floating_point() else x
        return out

    @classmethod
    def lung(cls) -> "HUWindow":
        return cls(lo=-1000.0, hi=400.0)

    def __repr__(self) -> str:
        return f"HUWindow(lo={self.a_min!r}, hi={self.a_max!r})"


class Normalize(Transform):
    """``(image - mean) / std``, per channel when given sequences (one entry per channel). With ``mean=None`` and
    ``std=None`` each channel is z-scored with its own statistics (``eps`` guards a constant channel)."""

    def __init__(self, *, mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                 eps: float = 1e-8) -> None:
        if (mean is None) != (std is None):
            raise ValueError("mean and std must both be given or both be None (per-sample z-score)")
        if mean is not None:
            m = (mean,) if isinstance(mean, numbers.Real) else mean
            s = (std,) if isinstance(std, numbers.Real) else std
            if not isinstance(m, Sequence) or not len(m) or not all(isinstance(v, numbers.Real) for v in m):
                raise ValueError(f"mean must be a number or a sequence of numbers (one per channel), got {mean!r}")
            if not isinstance(s, Sequence) or not len(s) or not all(
                isinstance(v, numbers.Real) and v > 0 for v in s
            ):
                raise ValueError(f"std must be a positive number or a sequence of them (one per channel), got {std!r}")
            mean, std = tuple(float(v) for v in m), tuple(float(v) for v in s)
        if not isinstance(eps, numbers.Real) or eps < 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.mean, self.std, self.eps = mean, std, float(eps)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, d = _prepare(sample)
        image = out["image"]
        if not image.is_floating_point():
            image = image.float()
        c = image.shape[0]
        bshape = (c,) + (1,) * d
        if self.mean is None:
            flat = image.reshape(c, -1)
            mean = flat.mean(1).view(bshape)
            std = flat.std(1, unbiased=False).view(bshape) + self.eps
        else:
            for name, v in (("mean", self.mean), ("std", self.std)):
                if len(v) not in (1, c):
                    raise ValueError(f"{name} has {len(v)} entries but the image has {c} channels")
            out["image"] = normalize_intensity(image, 1.0, self.mean, self.std).to(image.dtype)  # the one family
            return out
        out["image"] = (image - mean) / std
        return out


class CropOrPad(Transform):
    """Centre crop and/or pad to exactly ``size``: origin ``(n - size) // 2`` per axis (floor; negative means pad,
    the odd voxel of padding goes after, the odd voxel of cropping is removed after). Visibility rule applies."""

    def __init__(self, *, size: int | Sequence[int], pad_value: float | str = 0.0, min_visibility: float = 0.5,
                 min_size: float = 1.0) -> None:
        self.size = _check_size_arg(size, "size")
        self.pad_value = _check_pad_value(pad_value, "pad_value")
        self.min_visibility, self.min_size = _check_visibility_args(min_visibility, min_size)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        _, d = _prepare(sample)
        size = _per_axis(self.size, d, "size", integer=True, positive=True)
        lo = [(n - s) // 2 for n, s in zip(sample["image"].shape[1:], size)]
        return crop(sample, lo, size, pad_value=self.pad_value, min_visibility=self.min_visibility,
                    min_size=self.min_size)


class RandomCrop(Transform):
    """Positive-aware random patch of ``size`` (module docstring): with probability ``pos_prob`` a window that contains
    a randomly chosen box (whole when it fits, else its centre), otherwise a uniform window. Visibility rule applies."""

    def __init__(self, *, size: int | Sequence[int], pos_prob: float = 0.5, min_visibility: float = 0.5,
                 min_size: float = 1.0, pad_value: float | str = 0.0) -> None:
        self.size = _check_size_arg(size, "size")
        self.pos_prob = _check_prob(pos_prob, "pos_prob")
        self.min_visibility, self.min_size = _check_visibility_args(min_visibility, min_size)
        self.pad_value = _check_pad_value(pad_value, "pad_value")

    def sample_origin(self, sample: Mapping, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """Draw the crop origin (integer voxel, per axis) the way ``__call__`` does."""
        out, d = _prepare(sample)
        size = torch.tensor(_per_axis(self.size, d, "size", integer=True, positive=True))
        n = torch.tensor(out["image"].shape[1:])
        a_min = torch.minimum(n - size, torch.zeros_like(n))
        a_max = torch.maximum(n - size, torch.zeros_like(n))
        boxes = out.get("boxes")
        positive = bool(_rand(generator)[0] < self.pos_prob)
        if positive and boxes is not None and boxes.shape[0] > 0:
            i = int(_randint(torch.zeros(1, dtype=torch.long), torch.tensor([boxes.shape[0] - 1]), generator))
            box = boxes[i].detach().double().cpu()
            lo_b, hi_b = box[:d], box[d:]
            s = size.double()
            # whole box: lo <= lo_b and lo + s >= hi_b
            w_lo = torch.maximum(torch.ceil(hi_b - s).long(), a_min)
            w_hi = torch.minimum(torch.floor(lo_b).long(), a_max)
            # centre: lo <= c < lo + s
            c = (lo_b + hi_b) / 2
            c_lo = torch.maximum(torch.floor(c - s).long() + 1, a_min)
            c_hi = torch.minimum(torch.floor(c).long(), a_max)
            use_whole = (hi_b - lo_b <= s) & (w_lo <= w_hi)
            lo_r = torch.where(use_whole, w_lo, c_lo)
            hi_r = torch.where(use_whole, w_hi, c_hi)
            # a centre outside the image gives an empty range: fall back to the nearest admissible origin
            lo_r = torch.minimum(torch.maximum(lo_r, a_min), a_max)
            hi_r = torch.maximum(torch.minimum(torch.maximum(hi_r, a_min), a_max), lo_r)
            origin = _randint(lo_r, hi_r, generator)
        else:
            origin = _randint(a_min, a_max, generator)
        return tuple(int(v) for v in origin)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        _, d = _prepare(sample)
        size = _per_axis(self.size, d, "size", integer=True, positive=True)
        lo = self.sample_origin(sample, generator)
        return crop(sample, lo, size, pad_value=self.pad_value, min_visibility=self.min_visibility,
                    min_size=self.min_size)


class RandomFlip(Transform):
    """Flip each of ``axes`` (default: all spatial axes) independently with probability ``p``."""

    def __init__(self, *, axes: int | Sequence[int] | None = None, p: float = 0.5) -> None:
        if axes is not None:
            axes = _static_axes(axes, "axes")
        self.axes = axes
        self.p = _check_prob(p, "p")

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, d = _prepare(sample)
        axes = tuple(range(d)) if self.axes is None else _check_axes(self.axes, d, "axes")
        draws = _rand(generator, len(axes))
        chosen = [a for a, u in zip(axes, draws.tolist()) if u < self.p]
        return flip(out, chosen)


class RandomRot90(Transform):
    """With probability ``p`` rotate by ``k * 90`` degrees, ``k`` uniform in ``{1, 2, 3}``, in the plane ``axes``."""

    def __init__(self, *, axes: Sequence[int] = (-2, -1), p: float = 0.5) -> None:
        if not isinstance(axes, Sequence) or len(axes) != 2:
            raise ValueError(f"axes must be a pair of distinct spatial axes, got {axes!r}")
        self.axes = _static_axes(axes, "axes")
        self.p = _check_prob(p, "p")

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, d = _prepare(sample)
        u = _rand(generator, 2).tolist()
        if u[0] >= self.p:
            return out
        return rot90(out, 1 + min(int(u[1] * 3), 2), self.axes)


class RandomScale(Transform):
    """With probability ``p`` zoom by a factor uniform in ``range`` (one factor for all axes when ``isotropic``, else
    one per axis) via :func:`scale`: the image size changes (follow with a crop), boxes and spacing follow exactly."""

    def __init__(self, *, range: tuple[float, float] = (0.85, 1.25), isotropic: bool = True, p: float = 1.0,
                 mode: str = "linear") -> None:
        self.range = _check_range(range, "range", positive=True)
        if self.range is None:
            raise ValueError("range must be a pair (low, high) of positive zoom factors, got None")
        self.isotropic = bool(isotropic)
        self.p = _check_prob(p, "p")
        self.mode = _check_mode(mode)

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, d = _prepare(sample)
        if _rand(generator)[0] >= self.p:
            return out
        f = _uniform(*self.range, generator, 1 if self.isotropic else d).tolist()
        return scale(out, f * d if self.isotropic else f, mode=self.mode)


class RandomIntensity(Transform):
    """Random intensity augmentation of the image only, applied with probability ``p`` in this order:

    * ``gamma`` (range or None): the image is min-max normalised, raised to ``gamma``, and mapped back;
    * ``scale`` (range or None): multiplied by a factor;
    * ``shift`` (range or None): a constant added;
    * ``noise_std`` (number, range or None): Gaussian noise with that standard deviation (drawn from the range).

    One draw per sample (shared by all channels). Defaults assume normalised intensities (~[0, 1] or z-scores).
    """

    def __init__(self, *, scale: tuple[float, float] | None = (0.9, 1.1),
                 shift: tuple[float, float] | None = (-0.1, 0.1),
                 noise_std: float | tuple[float, float] | None = None,
                 gamma: tuple[float, float] | None = None, p: float = 1.0) -> None:
        self.scale = _check_range(scale, "scale", positive=True)
        self.shift = _check_range(shift, "shift")
        if isinstance(noise_std, numbers.Real) and not isinstance(noise_std, bool):
            noise_std = (float(noise_std), float(noise_std))
        self.noise_std = _check_range(noise_std, "noise_std")
        if self.noise_std is not None and self.noise_std[0] < 0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std!r}")
        self.gamma = _check_range(gamma, "gamma", positive=True)
        self.p = _check_prob(p, "p")

    def __call__(self, sample: Mapping, generator: torch.Generator | None = None) -> dict:
        out, _ = _prepare(sample)
        if _rand(generator)[0] >= self.p:
            return out
        image = out["image"]
        if not image.is_floating_point():
            image = image.float()
        if self.gamma is not None:
            g = float(_uniform(*self.gamma, generator))
            mn, mx = image.amin(), image.amax()
            rng = (mx - mn).clamp(min=1e-8)
            image = ((image - mn) / rng).clamp(0, 1).pow(g) * rng + mn
        if self.scale is not None:
            image = image * float(_uniform(*self.scale, generator))
        if self.shift is not None:
            image = image + float(_uniform(*self.shift, generator))
        if self.noise_std is not None:
            sd = float(_uniform(*self.noise_std, generator))
            if sd > 0:
                noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
                image = image + sd * noise.to(image.device)
        out["image"] = image
        return out
