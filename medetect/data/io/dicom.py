"""Single DICOM files through pydicom: pixel values (modality and VOI transforms), metadata and geometry."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...convert import Geometry
from ..image import MedicalImage, MedicalImageError
from ._common import _err, _existing_file, _short


# ============================================================================================== DICOM: values


_VOI_CHOICES = ("none", "window", "lut", "auto")


def _dcmread(path: Path, **kw):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), **kw)
    except InvalidDicomError as e:
        raise _err(path, f"not a DICOM file (no 'DICM' preamble / File Meta header): {e}") from e
    except (OSError, EOFError, ValueError, KeyError, TypeError, NotImplementedError, struct.error) as e:
        raise _err(path, f"cannot parse the DICOM file (corrupt or truncated?): {_short(e)}") from e


def _check_pixel_data(ds, path: Path) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds, "SOPClassUID", None)
        kind = f" (SOP class {getattr(sop, 'name', sop)})" if sop else ""
        raise _err(path, f"DICOM file has no pixel data element (7FE0,0010){kind}: not an image object, or truncated")


def _decode(ds, path: Path) -> np.ndarray:
    """Stored pixel values (native dtype), pydicom layout ``[frames,] rows, cols[, samples]``."""
    _check_pixel_data(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises ValueError, RuntimeError, NotImplementedError, AttributeError...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_s = f" (transfer syntax {getattr(ts, 'name', ts)})" if ts is not None else ""
        raise _err(path, f"cannot decode DICOM pixel data{ts_s}: {_short(e)}") from e
    return np.asarray(arr)


def _is_integral(x: Any) -> bool:
    try:
        return float(x).is_integer()
    except (TypeError, ValueError):
        return False


def _has_modality_transform(ds) -> bool:
    if "ModalityLUTSequence" in ds:
        return True
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    return not (slope == 1.0 and intercept == 0.0)


def _modality_is_integral(ds) -> bool:
    if "ModalityLUTSequence" in ds:
        return True  # LUT entries are integers
    return _is_integral(ds.get("RescaleSlope", 1) or 1) and _is_integral(ds.get("RescaleIntercept", 0) or 0)


def _stored_range(ds, dtype: np.dtype) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", 0) or 0) or dtype.itemsize * 8
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _pixel_helpers():
    """pydicom's value-transform helpers (``pydicom.pixels`` in 3.x, ``pixel_data_handlers.util`` in 2.x)."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi, apply_windowing
    return apply_modality_lut, apply_voi, apply_windowing


def _values(stored: np.ndarray, ds, path: Path, voi: str, voi_index: int) -> tuple[np.ndarray, str]:
    """Modality transform, VOI and MONOCHROME1 inversion for one monochrome frame.

    Returns ``(values, kind)``: ``"native"`` when the values are the stored ones in their native dtype (possibly
    inverted, which stays inside the stored range), ``"modality"`` when they went through a modality transform
    (float64 or LUT-typed; the caller chooses the output dtype), ``"voi"`` for float32 VOI output in ``[0, 1]``.
    """
    apply_modality_lut, apply_voi, apply_windowing = _pixel_helpers()

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    mono1 = photometric == "MONOCHROME1"
    changed = _has_modality_transform(ds)
    try:
        values = apply_modality_lut(stored, ds) if changed else stored
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
        raise _err(path, f"cannot apply the modality transform (rescale / modality LUT): {_short(e)}") from e

    if voi != "none":
        has_win = "WindowCenter" in ds and "WindowWidth" in ds
        has_lut = "VOILUTSequence" in ds
        if voi == "window" and not has_win:
            raise _err(path, "voi='window' asked but the file has no WindowCenter/WindowWidth")
        if voi == "lut" and not has_lut:
            raise _err(path, "voi='lut' asked but the file has no VOI LUT Sequence (0028,3010)")
        if voi == "auto" and not (has_win or has_lut):
            voi = "none"
    if voi != "none":
        use_lut = voi == "lut" or (voi == "auto" and has_lut)
        try:
            if use_lut:  # what pydicom's apply_voi_lut does first when a LUT is present
                out = np.asarray(apply_voi(values, ds, index=voi_index), dtype=np.float64)
                bits = int(ds.VOILUTSequence[voi_index].LUTDescriptor[2])
                lo, hi = 0.0, float(2**bits - 1)
            else:
                out = np.asarray(apply_windowing(np.asarray(values, dtype=np.float64), ds, index=voi_index),
                                 dtype=np.float64)
                probe = apply_windowing(np.array([-1e300, 1e300]), ds, index=voi_index)  # pydicom's output range
                lo, hi = float(probe[0]), float(probe[1])
        except (IndexError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise _err(path, f"cannot apply VOI {voi!r} (index {voi_index}): {_short(e)}") from e
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        if mono1:
            out = 1.0 - out
        return np.clip(out, 0.0, 1.0).astype(np.float32), "voi"

    if mono1:
        lo, hi = _stored_range(ds, stored.dtype)
        if changed:
            r = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds), dtype=np.float64)
            values = (float(r.min()) + float(r.max())) - np.asarray(values, dtype=np.float64)
        else:
            if stored.dtype.kind not in "iu":
                return (lo + hi) - stored.astype(np.float64), "modality"
            inv = (lo + hi) - stored.astype(np.int64)
            info = np.iinfo(stored.dtype)
            if inv.size and (inv.min() < info.min or inv.max() > info.max):
                return inv.astype(np.float64), "modality"  # stored values outside BitsStored: let the caller widen
            return inv.astype(stored.dtype), "native"
    return values, ("modality" if changed else "native")


def _output_dtype(native: np.dtype, integral: bool, vmin: float, vmax: float) -> np.dtype:
    """dtype of transformed values: int16 when integral and in range, else int32, else float32."""
    if integral and math.isfinite(vmin) and math.isfinite(vmax):
        for dt in (np.int16, np.int32):
            info = np.iinfo(dt)
            if vmin >= info.min and vmax <= info.max:
                return np.dtype(dt)
    return np.dtype(np.float32) if native.itemsize <= 4 or native.kind != "f" else np.dtype(np.float64)


def _dicom_meta(ds) -> dict[str, Any]:
    def s(key):
        v = ds.get(key, None)
        if v is None or isinstance(v, str) and v == "":
            return None
        if not isinstance(v, str) and hasattr(v, "__iter__"):  # multi-valued, e.g. ConvolutionKernel ['FC', 'ORG']
            return "\\".join(str(x) for x in v) or None
        return str(v)

    def floats(key):
        v = ds.get(key, None)
        if v in (None, ""):
            return None
        items = [v] if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") else list(v)
        try:
            return [float(x) for x in items]
        except (TypeError, ValueError):
            return None

    meta: dict[str, Any] = {
        "format": "DICOM",
        "modality": s("Modality"),
        "photometric": s("PhotometricInterpretation"),
        "patient_id": s("PatientID"),
        "study_uid": s("StudyInstanceUID"),
        "series_uid": s("SeriesInstanceUID"),
        "sop_class_uid": s("SOPClassUID"),
        "series_description": s("SeriesDescription"),
        "kernel": s("ConvolutionKernel"),
        "manufacturer": s("Manufacturer"),
        "body_part": s("BodyPartExamined"),
        "view_position": s("ViewPosition"),
        "laterality": s("ImageLaterality") or s("Laterality"),
        "slice_thickness": (floats("SliceThickness") or [None])[0],
        "rescale_slope": (floats("RescaleSlope") or [None])[0],
        "rescale_intercept": (floats("RescaleIntercept") or [None])[0],
        "bits_stored": int(ds.BitsStored) if "BitsStored" in ds else None,
    }
    centres, widths = floats("WindowCenter"), floats("WindowWidth")
    if centres and widths:
        meta["windows"] = [(c, w) for c, w in zip(centres, widths)]
    return {k: v for k, v in meta.items() if v is not None}


def _pixel_spacing(ds) -> tuple[tuple[float, float], str]:
    """(row spacing, column spacing) = spacing along array axes (y, x), and which tag gave it."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(key, None)
        if v not in (None, "") and len(v) == 2:
            sp = (float(v[0]), float(v[1]))
            if all(x > 0 and math.isfinite(x) for x in sp):
                return sp, key
    return (1.0, 1.0), "none"


# ============================================================================================== DICOM: geometry


def _stack_geometry(
    positions: np.ndarray,
    orientations: np.ndarray,
    pixel_spacing: tuple[float, float],
    names: Sequence[str],
    *,
    allow_gaps: bool,
    gap_tolerance: float,
    single_step: float,
    where: str,
) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    """Sort slices along their normal, check the stack and build its 3D geometry.

    positions ``[n, 3]`` (ImagePositionPatient), orientations ``[n, 6]`` (ImageOrientationPatient), names for error
    messages. Returns (sorted order, geometry, meta notes).
    """
    n = len(positions)
    iop = orientations[0]
    bad = np.flatnonzero(np.abs(orientations - iop).max(axis=1) > 1e-4)
    if bad.size:
        i = int(bad[0])
        raise MedicalImageError(
            f"{where}: inconsistent ImageOrientationPatient: {names[0]!r} has {iop.tolist()} but {names[i]!r} has "
            f"{orientations[i].tolist()}"
        )
    row, col = iop[:3].astype(np.float64), iop[3:].astype(np.float64)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
        raise MedicalImageError(f"{where}: ImageOrientationPatient {iop.tolist()} of {names[0]!r} is not two "
                                "orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    pos = positions[order]
    notes: dict[str, Any] = {"slice_positions_mm": [float(x) for x in d]}

    # slices must lie on a line along the normal (no gantry tilt / shear: that needs resampling, not stacking)
    inplane = (pos - pos[0]) - np.outer(d - d[0], normal)
    dev = np.linalg.norm(inplane, axis=1)
    tol_in = 0.05 * min(pixel_spacing) + 1e-3
    if n > 1 and dev.max() > tol_in:
        k = int(dev.argmax())
        raise MedicalImageError(
            f"{where}: slices are not stacked along the slice normal ({names[order[k]]!r} is {dev[k]:.3f} mm off the "
            f"line through {names[order[0]]!r}; gantry tilt or sheared series), cannot build a regular 3D grid"
        )

    if n == 1:
        return order, _geometry3(single_step, pixel_spacing, pos[0], row, col, normal), notes

    steps = np.diff(d)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise MedicalImageError(
            f"{where}: duplicate slice position {d[i]:.4f} mm along the normal: {names[order[i]]!r} and "
            f"{names[order[i + 1]]!r} (same image twice, or two series/acquisitions mixed: pick one with --series-uid UID "
            "(Python: series_uid=) or separate the files)"
        )
    step = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - step) > gap_tolerance * step)
    if off.size:
        desc = [
            f"{names[order[i]]!r} ({d[i]:.3f} mm) -> {names[order[i + 1]]!r} ({d[i + 1]:.3f} mm): step "
            f"{steps[i]:.4g} mm"
            for i in off[:5]
        ]
        if not allow_gaps:
            raise MedicalImageError(
                f"{where}: non-uniform slice spacing (median step {step:.4g} mm, tolerance {gap_tolerance:.0%}): "
                + "; ".join(desc) + ("; ..." if off.size > 5 else "")
                + ". Missing slices? Pass --allow-gaps (Python: allow_gaps=True) to stack anyway with the median step."
            )
        notes["uniform_slices"] = False
        notes["gaps"] = desc
    else:
        notes["uniform_slices"] = True
    return order, _geometry3(step, pixel_spacing, pos[0], row, col, normal), notes


def _geometry3(step, pixel_spacing, origin, row, col, normal) -> Geometry:
    direction = np.stack([row, col, normal], axis=1)  # columns: ITK index i (x, along a row), j (y), k (slice)
    return Geometry((float(step), float(pixel_spacing[0]), float(pixel_spacing[1])), tuple(map(float, origin)),
                    tuple(direction.reshape(-1).tolist()))


def _floats(v, n: int) -> np.ndarray | None:
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) and np.isfinite(a).all() else None


# ============================================================================================== DICOM: readers


def _check_voi(voi: str) -> None:
    if voi not in _VOI_CHOICES:
        raise ValueError(f"voi must be one of {_VOI_CHOICES}, got {voi!r}")


def _finish_values(parts: list[tuple[np.ndarray, str]], native: np.dtype, integral: bool) -> np.ndarray:
    """Stack per-frame values into one array with one dtype for all (rules in :func:`read_dicom`)."""
    kinds = {k for _, k in parts}
    if "voi" in kinds:
        return np.stack([v for v, _ in parts]).astype(np.float32, copy=False)
    if kinds == {"native"}:
        return np.stack([v for v, _ in parts])
    vmin = min(float(np.min(v)) for v, _ in parts)
    vmax = max(float(np.max(v)) for v, _ in parts)
    dt = _output_dtype(native, integral, vmin, vmax)
    out = np.empty((len(parts),) + parts[0][0].shape, dtype=dt)
    for i, (v, _) in enumerate(parts):
        out[i] = np.rint(v) if dt.kind in "iu" and v.dtype.kind == "f" else v
    return out


def read_dicom(path: str | os.PathLike, *, voi: str = "none", voi_index: int = 0) -> MedicalImage:
    """Read one DICOM file with pydicom.

    Values (monochrome):

    1. Modality transform with pydicom's ``apply_modality_lut`` (RescaleSlope/Intercept or Modality LUT). Output
       dtype: the native stored dtype when there is no transform (slope 1, intercept 0, no LUT); otherwise int16 when
       slope and intercept are integers and the result fits, else int32, and float32 for non-integer slope/intercept.
    2. ``voi``: ``"none"`` (default) keeps modality values (HU for CT). ``"window"`` applies WindowCenter/Width
       number ``voi_index`` (pydicom ``apply_windowing``, honours VOILUTFunction), ``"lut"`` the VOI LUT Sequence
       (``apply_voi``), ``"auto"`` whichever the file has (LUT first, pydicom's ``apply_voi_lut`` order; nothing if
       neither). A VOI result is float32 rescaled to ``[0, 1]`` (0 = darkest). Asking for a VOI the file lacks is an
       error.
    3. MONOCHROME1 is inverted so that bright = dense, like MONOCHROME2: with ``voi="none"`` the values are mirrored
       inside the nominal range (BitsStored range mapped through the modality transform: ``lo + hi - v``); after a
       VOI, ``1 - v``. ``meta["inverted"] = True`` and ``meta["photometric"]`` keeps the original tag.

    Colour (SamplesPerPixel 3) images come out as RGB ``[3, H, W]`` (pydicom converts YBR), without value transforms.

    Geometry: a single-frame file is 2D, spacing ``(row spacing, column spacing)`` from PixelSpacing, else
    ImagerPixelSpacing (projection radiographs / mammograms; no magnification correction), else 1.0
    (``meta["spacing_source"]`` says which), origin 0, identity direction. ImagePositionPatient /
    ImageOrientationPatient, when present, are kept in ``meta["ipp"]`` / ``meta["iop"]``. A multi-frame file is 3D:
    when every frame has a plane position (enhanced objects' functional groups) the frames are sorted and checked like
    a series (:func:`read_dicom_series`); otherwise frames keep their stored order, with identity direction and
    SpacingBetweenSlices / SliceThickness / 1.0 as slice step (``meta["frame_geometry"] = "approximate"``).
    """
    _check_voi(voi)
    p = _existing_file(path)
    ds = _dcmread(p)
    _promote_shared_rescale(ds)
    stored = _decode(ds, p)
    meta = _dicom_meta(ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if samples > 1:
        if voi != "none":
            raise _err(p, f"voi={voi!r} only applies to monochrome images; this one has {samples} samples per pixel")
        array = np.moveaxis(stored, -1, 0)
        meta["photometric_decoded"] = "RGB"
    else:
        if frames > 1 and stored.ndim == 3:
            parts = [_values(stored[f], ds, p, voi, voi_index) for f in range(frames)]
            array = _finish_values(parts, stored.dtype, _modality_is_integral(ds))[None]
        else:
            array = _finish_values([_values(stored, ds, p, voi, voi_index)], stored.dtype, _modality_is_integral(ds))
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            meta["inverted"] = True
    if voi != "none":
        meta["voi"] = voi
    spacing, src = _pixel_spacing(ds)
    meta["spacing_source"] = src
    ipp = _floats(ds.get("ImagePositionPatient", []) or [], 3)
    iop = _floats(ds.get("ImageOrientationPatient", []) or [], 6)
    if ipp is not None:
        meta["ipp"] = ipp.tolist()
    if iop is not None:
        meta["iop"] = iop.tolist()

    spatial = array.shape[1:]
    if len(spatial) == 2:
        geometry = Geometry.identity(2, spacing)
    else:
        geometry, order, notes = _multiframe_geometry(ds, p, spacing, spatial[0])
        if order is not None:
            array = np.ascontiguousarray(array[:, order])
        meta.update(notes)
    return MedicalImage(np.ascontiguousarray(array), geometry, meta, str(p))


def _promote_shared_rescale(ds) -> None:
    """Enhanced multi-frame objects keep the rescale in the shared functional groups; pydicom's modality helper
    reads the top-level tags, so copy it there (per-frame differing rescales are not supported)."""
    if "RescaleSlope" in ds or "SharedFunctionalGroupsSequence" not in ds or not ds.SharedFunctionalGroupsSequence:
        return
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "PixelValueTransformationSequence" in shared and shared.PixelValueTransformationSequence:
        pvt = shared.PixelValueTransformationSequence[0]
        if "RescaleSlope" in pvt and "RescaleIntercept" in pvt:
            ds.RescaleSlope = pvt.RescaleSlope
            ds.RescaleIntercept = pvt.RescaleIntercept


def _multiframe_geometry(ds, p: Path, spacing, n_frames: int):
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    per = ds.get("PerFrameFunctionalGroupsSequence", None)

    def find(item, seq_name, key):
        if item is None or seq_name not in item or not item[seq_name].value:
            return None
        return item[seq_name].value[0].get(key, None)

    sh = shared[0] if shared else None
    iop_sh = find(sh, "PlaneOrientationSequence", "ImageOrientationPatient")
    ps_sh = find(sh, "PixelMeasuresSequence", "PixelSpacing")
    if ps_sh is not None and _floats(ps_sh, 2) is not None:
        spacing = tuple(_floats(ps_sh, 2))
    if per is not None and len(per) == n_frames:
        ipps, iops = [], []
        for item in per:
            ipps.append(_floats(find(item, "PlanePositionSequence", "ImagePositionPatient") or [], 3))
            iops.append(_floats(find(item, "PlaneOrientationSequence", "ImageOrientationPatient") or iop_sh
                                or ds.get("ImageOrientationPatient", []) or [], 6))
        if all(x is not None for x in ipps) and all(x is not None for x in iops):
            names = [f"{p.name} frame {i}" for i in range(n_frames)]
            order, geom, notes = _stack_geometry(
                np.stack(ipps), np.stack(iops), spacing, names, allow_gaps=False, gap_tolerance=0.05,
                single_step=_slice_step(ds), where=repr(str(p)),
            )
            return geom, order, notes
    return Geometry((_slice_step(ds), *spacing), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1))), None, {
        "frame_geometry": "approximate"}


def _slice_step(ds) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        v = ds.get(key, None)
        try:
            f = abs(float(v))
        except (TypeError, ValueError):
            continue
        if f > 0 and math.isfinite(f):
            return f
    return 1.0
