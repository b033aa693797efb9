"""Read and write medical images as :class:`~medetect.data.image.MedicalImage`.

One entry point, :func:`read_image`, dispatches on what it is given:

==========================================  ===========================  ===============================================
input                                       reader                       library
==========================================  ===========================  ===============================================
folder, or list/tuple of files              :func:`read_dicom_series`    pydicom
``.dcm .dicom .ima``, or any file with the  :func:`read_dicom`           pydicom
``DICM`` preamble (UID-named, no suffix)
``.png .jpg .jpeg .pgm .ppm .pnm .pbm       :func:`read_pillow`          Pillow
.tif .tiff .bmp``
``.nii .nii.gz .mhd .mha .nrrd``            :func:`read_sitk`            SimpleITK
``.npz`` (Lung-PET-CT-Dx sample layout)     :func:`read_npz`             numpy
==========================================  ===========================  ===============================================

:func:`write_image` writes ``.mhd .mha .nii .nii.gz .nrrd`` (SimpleITK, geometry included), ``.png`` (2D uint8 or
uint16, geometry NOT stored) and ``.npz`` (same key layout as the reader).

Errors: a missing path raises :class:`FileNotFoundError`; anything wrong with a file's content (corrupt, truncated,
unsupported, no pixel data, inconsistent series, wrong dimensionality) raises
:class:`~medetect.data.image.MedicalImageError` (a :class:`ValueError`) whose message starts with the offending file.

Array and geometry conventions are those of :mod:`medetect.convert`: arrays in numpy axis order (``z, y, x``), channels
first, spacing per array axis, origin/direction in ITK/DICOM LPS world ``(x, y, z)`` millimetres.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..convert import Geometry
from .image import MedicalImage, MedicalImageError

__all__ = [
    "read_image",
    "read_pillow",
    "read_dicom",
    "read_dicom_series",
    "read_sitk",
    "read_npz",
    "write_image",
    "READ_EXTENSIONS",
    "WRITE_EXTENSIONS",
]

PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pnm", ".pbm", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
SITK_EXTENSIONS = (".nii", ".nii.gz", ".mhd", ".mha", ".nrrd")
NPZ_EXTENSIONS = (".npz",)
READ_EXTENSIONS = PILLOW_EXTENSIONS + DICOM_EXTENSIONS + SITK_EXTENSIONS + NPZ_EXTENSIONS
WRITE_EXTENSIONS = SITK_EXTENSIONS + (".png",) + NPZ_EXTENSIONS

# Files a DICOM folder commonly holds next to the images; never treated as slices.
_NON_DICOM_SUFFIXES = frozenset(
    PILLOW_EXTENSIONS + SITK_EXTENSIONS + NPZ_EXTENSIONS
    + (".txt", ".json", ".xml", ".csv", ".md", ".html", ".pdf", ".zip", ".gz", ".py", ".raw", ".zraw", ".log")
)


# ============================================================================================== helpers


def _ext(path: str | os.PathLike) -> str:
    """Lower-case extension, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r}: no such file")
    if p.is_dir():
        raise MedicalImageError(f"{str(p)!r}: is a folder, expected a file (use read_dicom_series for a DICOM folder)")
    return p


def _err(path: str | os.PathLike, what: str) -> MedicalImageError:
    return MedicalImageError(f"{str(path)!r}: {what}")


def _short(e: BaseException) -> str:
    """First meaningful line of a library exception (SimpleITK's are many lines of C++ context)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "ERROR" in ln), lines[0] if lines else "")
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# ============================================================================================== dispatch


def read_image(path: str | os.PathLike | Sequence[str | os.PathLike], **kw: Any) -> MedicalImage:
    """Read any supported image; keyword arguments go to the reader chosen (see the module table).

    * a folder or a list/tuple of paths -> :func:`read_dicom_series` (``series_uid=``, ``allow_gaps=``,
      ``gap_tolerance=``, ``voi=``, ``voi_index=``);
    * a DICOM file -> :func:`read_dicom` (``voi=``, ``voi_index=``);
    * Pillow / SimpleITK / npz files -> their readers (no options).

    A file whose extension is unknown (including none, or a UID-like name such as ``1.2.840.10008.1``) is read as
    DICOM if it has the ``DICM`` preamble, otherwise :class:`MedicalImageError` lists the supported extensions.
    """
    if isinstance(path, (list, tuple)):
        return read_dicom_series(path, **kw)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r}: no such file or folder")
    if p.is_dir():
        return read_dicom_series(p, **kw)
    ext = _ext(p)
    if ext in PILLOW_EXTENSIONS:
        return read_pillow(p, **kw)
    if ext in SITK_EXTENSIONS:
        return read_sitk(p, **kw)
    if ext in NPZ_EXTENSIONS:
        return read_npz(p, **kw)
    if ext in DICOM_EXTENSIONS or _has_dicom_preamble(p):
        return read_dicom(p, **kw)
    raise _err(
        p,
        f"unsupported extension {ext or '(none)'!r} and no DICOM preamble; supported: "
        f"{', '.join(READ_EXTENSIONS)}, DICOM files of any name, or a DICOM folder",
    )


# ============================================================================================== Pillow


def _ppm_maxval(im) -> int | None:
    """maxval of a PGM/PPM as Pillow parsed it (its tile args), or None for other formats."""
    if im.format != "PPM":
        return None
    try:
        tile = im.tile[0]
        args = tile.args if hasattr(tile, "args") else tile[3]
    except (IndexError, AttributeError, TypeError):
        return None
    if isinstance(args, tuple) and len(args) >= 2 and isinstance(args[1], int):
        return int(args[1])  # "ppm" decoder: values will be rescaled by Pillow
    if im.mode == "L" or im.mode == "RGB":
        return 255
    if im.mode == "I":
        return 65535
    return None


def _pil_frame(im, path: Path, maxval: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """One Pillow frame -> ``[C, H, W]`` array plus per-frame notes."""
    mode = im.mode
    notes: dict[str, Any] = {}
    if mode == "1":
        arr = np.asarray(im.convert("L"))
    elif mode == "L":
        arr = np.asarray(im)
    elif mode == "LA":
        arr = np.asarray(im)[..., 0]
        notes["alpha_dropped"] = True
    elif mode in ("P", "PA"):
        if mode == "PA" or "transparency" in im.info:
            notes["alpha_dropped"] = True
        arr = np.asarray(im.convert("RGB"))
    elif mode == "RGB":
        arr = np.asarray(im)
    elif mode in ("RGBA", "RGBa"):
        arr = np.asarray(im.convert("RGBA"))[..., :3]
        notes["alpha_dropped"] = True
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(im.convert("RGB"))
    elif mode.startswith("I;16"):
        arr = np.asarray(im)
        arr = arr.astype(np.uint16) if arr.dtype != np.uint16 or not arr.dtype.isnative else arr
    elif mode == "I":
        arr = np.asarray(im)  # int32
        if im.format in ("PNG", "PPM") and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)  # a 16-bit grayscale PNG/PGM that Pillow widened to "I"
    elif mode == "F":
        arr = np.asarray(im).astype(np.float32, copy=False)
    else:
        raise _err(path, f"unsupported Pillow image mode {mode!r}")

    # Pillow stretches PGM values with a non-standard maxval (e.g. 4095) to 0..255 / 0..65535; undo it exactly so the
    # array holds the file's own sample values (Pillow's round(v/maxval*out_max) is injective since out_max >= maxval).
    if maxval is not None and arr.ndim == 2 and maxval not in (255, 65535):
        out_max = 255 if maxval <= 255 else 65535
        arr = np.rint(arr.astype(np.float64) * (maxval / out_max)).astype(np.uint8 if maxval <= 255 else np.uint16)

    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return np.ascontiguousarray(arr), notes


def read_pillow(path: str | os.PathLike) -> MedicalImage:
    """Read a PNG / JPEG / PGM-PPM-PBM / TIFF / BMP with Pillow.

    Decisions:

    * Channels: grayscale -> C=1, colour -> C=3 (RGB; palette, CMYK and YCbCr are converted to RGB). Alpha is
      DROPPED (``meta["alpha_dropped"] = True``): for detection it is not image content, and a colour network wants 3
      channels. Bilevel ("1") images become uint8 0/255.
    * dtypes: 8-bit -> uint8; 16-bit grayscale (PNG, PGM with maxval > 255, TIFF ``I;16``) -> uint16; 32-bit integer
      TIFF -> int32; float TIFF -> float32.
    * PGM/PPM: the array holds the file's sample values 0..maxval (Pillow's rescaling of non-standard maxvals such as
      4095 is undone); ``meta["maxval"]`` records maxval. Colour PPMs with maxval > 255 keep Pillow's 8-bit values.
    * Geometry: :meth:`Geometry.identity` (spacing 1 px, origin 0, identity direction) even when the file carries a
      DPI: print resolution says nothing about anatomy. The DPI, if any, is kept in ``meta["dpi"]``.
    * EXIF orientation is NOT applied (annotations refer to the stored pixel grid); a non-trivial tag is reported in
      ``meta["exif_orientation"]``.
    * A multi-page TIFF whose pages agree in size and mode becomes a 3D image ``[C, pages, H, W]`` with identity
      geometry.
    """
    from PIL import Image, UnidentifiedImageError

    p = _existing_file(path)
    try:
        with Image.open(p) as im:
            fmt = im.format
            maxval = _ppm_maxval(im)
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            meta: dict[str, Any] = {"format": fmt, "mode": im.mode}
            if "dpi" in im.info:
                meta["dpi"] = tuple(float(v) for v in im.info["dpi"])
            try:
                orient = im.getexif().get(0x0112)
            except Exception:  # broken EXIF must not make a readable picture unreadable
                orient = None
            if orient not in (None, 1):
                meta["exif_orientation"] = int(orient)
            frames = []
            for i in range(n_frames):
                if n_frames > 1:
                    im.seek(i)
                arr, notes = _pil_frame(im, p, maxval)
                meta.update(notes)
                frames.append(arr)
    except MedicalImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        kind = _ext(p).lstrip(".").upper() or "image"
        raise _err(p, f"cannot decode as a {kind} image (corrupt or truncated?): {_short(e)}") from e

    if maxval is not None:
        meta["maxval"] = maxval
    if len(frames) == 1:
        array = frames[0]
        geometry = Geometry.identity(2)
    else:
        shapes = {(f.shape, f.dtype) for f in frames}
        if len(shapes) != 1:
            raise _err(p, f"the {len(frames)} pages differ in size, channels or dtype ({sorted(map(str, shapes))}); "
                          "cannot stack them into a volume")
        array = np.stack(frames, axis=1)
        geometry = Geometry.identity(3)
        meta["n_frames"] = len(frames)
    meta["photometric"] = "MONOCHROME2" if array.shape[0] == 1 else "RGB"
    return MedicalImage(array, geometry, meta, str(p))


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
    centers, widths = floats("WindowCenter"), floats("WindowWidth")
    if centers and widths:
        meta["windows"] = [(c, w) for c, w in zip(centers, widths)]
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
            f"{names[order[i + 1]]!r} (same image twice, or two series/acquisitions mixed: pass series_uid= or "
            "separate the files)"
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
                + ". Missing slices? Pass allow_gaps=True to stack anyway with the median step."
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


def _series_files(source) -> tuple[list[Path], str, list[str]]:
    """Candidate files, the label used in messages (the folder), and the skipped non-DICOM names."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise MedicalImageError("read_dicom_series: empty list of files")
        files = [Path(f) for f in source]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{str(f)!r}: no such file (listed in a DICOM series)")
            if f.is_dir():
                raise MedicalImageError(f"{str(f)!r}: is a folder, expected a DICOM file (listed in a DICOM series)")
        try:
            label = os.path.commonpath([str(f.resolve().parent) for f in files])
        except ValueError:
            label = str(files[0].parent)
        return files, label, []
    folder = Path(source)
    if not folder.exists():
        raise FileNotFoundError(f"{str(folder)!r}: no such folder")
    if not folder.is_dir():
        raise MedicalImageError(f"{str(folder)!r}: not a folder (read one DICOM file with read_dicom)")
    files, skipped = [], []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        ext = _ext(f)
        if ext in DICOM_EXTENSIONS or (ext not in _NON_DICOM_SUFFIXES and _has_dicom_preamble(f)):
            files.append(f)
        else:
            skipped.append(f.name)
    if not files:
        raise MedicalImageError(f"{str(folder)!r}: no DICOM files in this folder (skipped: {skipped[:10]})")
    return files, str(folder), skipped


def read_dicom_series(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    series_uid: str | None = None,
    allow_gaps: bool = False,
    gap_tolerance: float = 0.05,
    voi: str = "none",
    voi_index: int = 0,
) -> MedicalImage:
    """Read a DICOM series (a folder, or a list of files) into one 3D image with pydicom.

    Folder contents: files with a ``.dcm/.dicom/.ima`` suffix, or any other non-hidden file with the ``DICM``
    preamble (UID-named files); ``DICOMDIR`` and files with common non-DICOM suffixes (.txt, .json, .png, ...) are
    skipped (``meta["skipped_files"]``). Every file listed explicitly must be DICOM.

    Checks (each failure is a :class:`MedicalImageError` naming the files involved):

    * one SeriesInstanceUID, or ``series_uid=`` picks one (mixed series -> error listing the UIDs and file counts);
    * pixel data present; same Rows/Columns, SamplesPerPixel (1), PixelSpacing and ImageOrientationPatient;
      ImagePositionPatient present on every slice;
    * slices are sorted by ImagePositionPatient projected on the slice normal ``row x col`` (never by
      InstanceNumber); they must lie on one line along the normal (no gantry tilt);
    * no two slices at the same position (duplicates);
    * uniform slice steps: a step deviating from the median by more than ``gap_tolerance`` (relative) is a gap,
      an error naming the two files around it, unless ``allow_gaps=True`` (then the median step is used as spacing,
      ``meta["uniform_slices"] = False``, ``meta["gaps"]`` describes them and ``meta["slice_positions_mm"]`` has
      the true positions).

    Geometry: spacing ``(slice step, row spacing, column spacing)`` in array order (z, y, x); origin = IPP of the first
    sorted slice; direction columns (ITK index i, j, k) = (IOP row cosine, IOP column cosine, normal). A one-file
    series uses SpacingBetweenSlices / SliceThickness / 1.0 as slice step.

    Values: per slice as in :func:`read_dicom` (modality rescale, VOI, MONOCHROME1 inversion), with one output dtype
    for the whole volume (int16 if all slopes and intercepts are integers and the volume fits, etc.).

    ``meta``: the DICOM fields of the first sorted slice (see :func:`read_dicom`) plus ``files`` and
    ``sop_instance_uids`` in sorted order, ``slice_positions_mm``, ``series_uids`` found. ``path`` is the folder.
    """
    _check_voi(voi)
    files, label, skipped = _series_files(source)
    where = repr(label)

    headers = []
    for f in files:
        ds = _dcmread(f, defer_size="256 KB")  # pixel data is read only for the chosen series
        headers.append((f, ds))

    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for f, ds in headers:
        groups[str(ds.get("SeriesInstanceUID", "") or "<no SeriesInstanceUID>")].append((f, ds))
    if series_uid is not None:
        if series_uid not in groups:
            raise MedicalImageError(f"{where}: no slice has SeriesInstanceUID {series_uid!r}; found "
                                    + ", ".join(f"{u} ({len(v)} files)" for u, v in groups.items()))
        chosen = groups[series_uid]
    elif len(groups) > 1:
        raise MedicalImageError(
            f"{where}: the files mix {len(groups)} series: "
            + "; ".join(f"{u} ({len(v)} files, e.g. {v[0][0].name!r})" for u, v in groups.items())
            + ". Pass series_uid= to pick one."
        )
    else:
        chosen = next(iter(groups.values()))

    names = [str(f) for f, _ in chosen]
    ref_f, ref = chosen[0]
    ref_shape = (ref.get("Rows", None), ref.get("Columns", None))
    ref_spacing, spacing_src = _pixel_spacing(ref)
    ipps, iops = [], []
    for f, ds in chosen:
        _check_pixel_data(ds, f)
        shape = (ds.get("Rows", None), ds.get("Columns", None))
        if shape != ref_shape:
            raise MedicalImageError(f"{where}: inconsistent slice shape: {str(ref_f)!r} is {ref_shape} (rows, cols) "
                                    f"but {str(f)!r} is {shape}")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise _err(f, "series slices must be single-frame monochrome (SamplesPerPixel 1, NumberOfFrames 1)")
        sp, _ = _pixel_spacing(ds)
        if not np.allclose(sp, ref_spacing, rtol=1e-4, atol=1e-6):
            raise MedicalImageError(f"{where}: inconsistent PixelSpacing: {str(ref_f)!r} has {ref_spacing} but "
                                    f"{str(f)!r} has {sp}")
        ipp = _floats(ds.get("ImagePositionPatient", None) or [], 3)
        iop = _floats(ds.get("ImageOrientationPatient", None) or [], 6)
        if ipp is None or iop is None:
            raise _err(f, "missing or invalid ImagePositionPatient / ImageOrientationPatient: cannot place the slice "
                          "in a 3D series")
        ipps.append(ipp)
        iops.append(iop)

    order, geometry, notes = _stack_geometry(
        np.stack(ipps), np.stack(iops), ref_spacing, names, allow_gaps=allow_gaps, gap_tolerance=gap_tolerance,
        single_step=_slice_step(ref), where=where,
    )

    stored_list = []
    for i in order:
        f, ds = chosen[int(i)]
        stored = _decode(ds, f)
        if stored.shape != tuple(ref_shape):
            raise _err(f, f"decoded pixel array has shape {stored.shape}, header says {ref_shape}")
        stored_list.append((stored, ds, f))
    natives = {s.dtype for s, _, _ in stored_list}
    native = np.result_type(*natives)
    parts = [_values(s.astype(native, copy=False), ds, f, voi, voi_index) for s, ds, f in stored_list]
    integral = all(_modality_is_integral(ds) for _, ds, _ in stored_list)
    volume = _finish_values(parts, native, integral)

    first_ds = stored_list[0][1]
    meta = _dicom_meta(first_ds)
    meta.update(notes)
    meta["spacing_source"] = spacing_src
    meta["files"] = [str(f) for _, _, f in stored_list]
    meta["sop_instance_uids"] = [str(ds.get("SOPInstanceUID", "")) for _, ds, _ in stored_list]
    meta["series_uids"] = sorted(groups)
    meta["num_slices"] = len(stored_list)
    if skipped:
        meta["skipped_files"] = skipped
    if voi != "none":
        meta["voi"] = voi
    if str(first_ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        meta["inverted"] = True
    return MedicalImage(np.ascontiguousarray(volume[None]), geometry, meta, label)


# ============================================================================================== SimpleITK


_SITK_FORMATS = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".mhd": "MetaImage", ".mha": "MetaImage", ".nrrd": "NRRD"}
_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


def _check_metaio(p: Path) -> None:
    """Check a MetaImage header before SimpleITK sees it: data file present and long enough."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as e:
        raise _err(p, f"cannot open: {e}") from e
    fields: dict[str, str] = {}
    header_len = None
    pos = 0
    for raw_line in head.split(b"\n"):
        line_end = pos + len(raw_line) + 1
        line = raw_line.decode("latin-1").strip()
        pos = line_end
        if "=" not in line:
            continue
        k, v = line.split("=", 1)
        fields[k.strip()] = v.strip()
        if k.strip() == "ElementDataFile":
            header_len = line_end
            break
    if "ElementDataFile" not in fields:
        raise _err(p, "not a valid MetaImage header: no 'ElementDataFile = ...' line (corrupt file?)")
    data_file = fields["ElementDataFile"]
    if data_file.upper() == "LOCAL":
        data_path, available = p, p.stat().st_size - min(header_len or 0, p.stat().st_size)
    elif data_file.upper().startswith("LIST") or "%" in data_file:
        return  # multi-file layouts: leave to SimpleITK
    else:
        data_path = Path(data_file) if os.path.isabs(data_file) else p.parent / data_file
        if not data_path.is_file():
            raise _err(p, f"its pixel data file {str(data_path)!r} (ElementDataFile = {data_file}) does not exist")
        available = data_path.stat().st_size
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    header_size = fields.get("HeaderSize", "0")
    size = _MET_SIZES.get(fields.get("ElementType", ""))
    try:
        dims = [int(x) for x in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise _err(p, f"invalid DimSize {fields.get('DimSize')!r} in MetaImage header") from None
    if compressed or header_size not in ("0", "") or size is None or not dims:
        return
    expected = int(np.prod(dims)) * channels * size
    if available < expected:
        raise _err(
            data_path if data_path != p else p,
            f"pixel data truncated: DimSize {dims} x {channels} channel(s) of {fields['ElementType']} needs "
            f"{expected} bytes, the file has {available}" + (f" (header {str(p)!r})" if data_path != p else ""),
        )


def _check_nifti(p: Path) -> None:
    """Check that a NIfTI-1/2 file holds all the voxels its header announces.

    SimpleITK silently returns partly uninitialised memory for a truncated ``.nii`` / ``.nii.gz``, so the header's
    ``dim``, ``bitpix`` and ``vox_offset`` are read (a few fixed offsets of the NIfTI header) and compared with the
    (decompressed) file length. A ``.nii.gz`` is streamed once for this, which also catches a broken gzip stream.
    """
    opener = gzip.open if _ext(p) == ".nii.gz" else open
    try:
        with opener(p, "rb") as fh:
            head = fh.read(540)
            total = len(head)
            while True:
                chunk = fh.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _err(p, f"corrupt or truncated gzip stream: {e}") from e
    for e in "<>":
        if len(head) >= 348 and int(np.frombuffer(head[:4], e + "i4")[0]) == 348:  # NIfTI-1
            dims = np.frombuffer(head[40:56], e + "i2").astype(np.int64)
            bitpix = int(np.frombuffer(head[72:74], e + "i2")[0])
            vox_offset = float(np.frombuffer(head[108:112], e + "f4")[0])
            break
        if len(head) >= 540 and int(np.frombuffer(head[:4], e + "i4")[0]) == 540:  # NIfTI-2
            bitpix = int(np.frombuffer(head[14:16], e + "i2")[0])
            dims = np.frombuffer(head[16:80], e + "i8").astype(np.int64)
            vox_offset = float(np.frombuffer(head[168:176], e + "i8")[0])
            break
    else:
        if total < 348:
            raise _err(p, f"truncated: {total} bytes, shorter than a NIfTI header (348)")
        return  # not NIfTI-1/2 (e.g. Analyze): leave it to SimpleITK
    nd = int(dims[0])
    if not 1 <= nd <= 7 or (dims[1 : nd + 1] <= 0).any() or bitpix <= 0 or not math.isfinite(vox_offset):
        return  # odd header: SimpleITK will judge
    expected = int(vox_offset) + int(np.prod(dims[1 : nd + 1])) * bitpix // 8
    if total < expected:
        what = "decompressed size" if opener is gzip.open else "file size"
        raise _err(p, f"pixel data truncated: the header announces {dims[1:nd + 1].tolist()} voxels of {bitpix} bits "
                      f"from offset {int(vox_offset)} ({expected} bytes), the {what} is {total} bytes")


def read_sitk(path: str | os.PathLike) -> MedicalImage:
    """Read NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mhd`` + data file, ``.mha``) or NRRD with SimpleITK.

    The array is ``GetArrayFromImage`` (``z, y, x``), with a channel axis in front: vector pixels (RGB, multi-component)
    become channels, scalar images get C=1. Geometry is :meth:`Geometry.from_sitk` (NIfTI's RAS qform/sform is
    already converted to LPS by SimpleITK). Only 2D and 3D images are accepted. Before SimpleITK reads a MetaImage,
    its ``ElementDataFile`` is checked: a missing data file or one shorter than DimSize needs raises an error naming
    that file; a NIfTI file is checked to hold all the voxels its header announces (SimpleITK would return
    uninitialised memory for a truncated one). ``meta`` holds ``format``, ``pixel_type`` and the image's metadata
    dictionary (``sitk_metadata``).
    """
    import SimpleITK as sitk

    p = _existing_file(path)
    ext = _ext(p)
    if ext in (".mhd", ".mha"):
        _check_metaio(p)
    elif ext in (".nii", ".nii.gz"):
        _check_nifti(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise _err(p, f"SimpleITK cannot read it (corrupt, truncated or not a {ext} image): {_short(e)}") from e
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise _err(p, f"{dim}D image (size {img.GetSize()}); only 2D and 3D images are supported")
    try:
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:  # pragma: no cover - decoding happened in ReadImage
        raise _err(p, f"SimpleITK cannot convert its pixels: {_short(e)}") from e
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    try:
        geometry = Geometry.from_sitk(img)
    except ValueError as e:
        raise _err(p, f"invalid geometry: {e}") from e
    meta: dict[str, Any] = {
        "format": _SITK_FORMATS.get(ext, ext[1:].upper()),
        "pixel_type": img.GetPixelIDTypeAsString(),
        "sitk_metadata": {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()},
    }
    return MedicalImage(np.ascontiguousarray(arr), geometry, meta, str(p))


# ============================================================================================== npz


def read_npz(path: str | os.PathLike) -> MedicalImage:
    """Read an ``.npz`` in the Lung-PET-CT-Dx sample layout.

    Keys: ``image`` (``[z, y, x]``, or ``[C, z, y, x]`` with channels; 2D ``[y, x]`` / ``[C, y, x]`` also accepted),
    ``spacing_zyx`` (mm per array axis), ``origin_xyz`` (world LPS mm of voxel 0's centre, DICOM IPP of slice 0) and
    ``orientation``: for 3D the 6 ImageOrientationPatient values (row cosine, column cosine); the direction's columns
    are (row, column, row x column). For 2D ``orientation`` is the 4 row-major entries of the 2x2 direction. Missing
    geometry keys default to unit spacing / zero origin / identity orientation and are listed in
    ``meta["missing_keys"]``. The dtype of ``image`` is kept (int16 HU for the sample).
    """
    p = _existing_file(path)
    try:
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # we own the handle: closed on errors too
            data = {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, ValueError (pickled object arrays), OSError, EOFError, zlib.error
        raise _err(p, f"cannot read as .npz (corrupt or truncated?): {_short(e)}") from e
    if "image" not in data:
        raise _err(p, f"no 'image' array in the .npz (keys: {sorted(data)})")
    image = data["image"]
    if "spacing_zyx" in data:
        spacing = np.asarray(data["spacing_zyx"], dtype=np.float64).reshape(-1)
        nd = spacing.size
    else:
        nd = 3 if image.ndim >= 3 else 2
        spacing = np.ones(nd)
    if nd not in (2, 3) or image.ndim not in (nd, nd + 1):
        raise _err(p, f"'image' of shape {image.shape} does not match spacing_zyx of {nd} entries (expected a "
                      f"{nd}D array, optionally with a leading channel axis)")
    array = image[None] if image.ndim == nd else image
    origin = np.asarray(data.get("origin_xyz", np.zeros(nd)), dtype=np.float64).reshape(-1)
    if origin.size != nd:
        raise _err(p, f"origin_xyz has {origin.size} entries, expected {nd}")
    if "orientation" in data:
        o = np.asarray(data["orientation"], dtype=np.float64).reshape(-1)
        if nd == 3:
            if o.size != 6:
                raise _err(p, f"orientation has {o.size} entries, expected the 6 ImageOrientationPatient values")
            row, col = o[:3], o[3:]
            if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
                    and abs(row @ col) < 1e-3):
                raise _err(p, f"orientation {o.tolist()} is not two orthogonal unit vectors")
            direction = np.stack([row, col, np.cross(row, col)], axis=1).reshape(-1)
        else:
            if o.size != 4:
                raise _err(p, f"orientation has {o.size} entries, expected the 4 entries of a 2x2 direction")
            direction = o
    else:
        direction = np.eye(nd).reshape(-1)
    missing = [k for k in ("spacing_zyx", "origin_xyz", "orientation") if k not in data]
    try:
        geometry = Geometry(tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.tolist()))
    except ValueError as e:
        raise _err(p, f"invalid geometry: {e}") from e
    meta: dict[str, Any] = {"format": "npz", "npz_keys": sorted(data)}
    if missing:
        meta["missing_keys"] = missing
    return MedicalImage(np.ascontiguousarray(array), geometry, meta, str(p))


# ============================================================================================== writers


def write_image(image: MedicalImage, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path``; the format comes from the extension. Returns the path written.

    * ``.mhd`` (+ ``.raw`` next to it), ``.mha``, ``.nii``, ``.nii.gz``, ``.nrrd``: SimpleITK, with spacing, origin
      and direction. C > 1 is written as a vector image. bool is written as uint8, float16 as float32; other dtypes
      unchanged (NIfTI stores directions as a RAS qform, so a non-orthonormal direction may not survive).
    * ``.png``: 2D only, uint8 with 1 or 3 channels or uint16 with 1 channel. Other dtypes are refused rather than
      silently rescaled. Geometry is not stored (a PNG reads back with identity geometry).
    * ``.npz``: the :func:`read_npz` layout (compressed); 3D needs a right-handed direction (third column = row x
      column), which is what ImageOrientationPatient can express.

    The parent folder must exist.
    """
    if not isinstance(image, MedicalImage):
        raise TypeError(f"write_image expects a MedicalImage, got {type(image).__name__}")
    p = Path(path)
    ext = _ext(p)
    if ext not in WRITE_EXTENSIONS:
        raise _err(p, f"cannot write extension {ext or '(none)'!r}; supported: {', '.join(WRITE_EXTENSIONS)}")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{str(p)!r}: parent folder {str(p.parent)!r} does not exist")
    if ext in SITK_EXTENSIONS:
        _write_sitk(image, p)
    elif ext == ".png":
        _write_png(image, p)
    else:
        _write_npz(image, p)
    return p


def _write_sitk(image: MedicalImage, p: Path) -> None:
    import SimpleITK as sitk

    arr = image.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    try:
        if arr.shape[0] == 1:
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr[0]))
        else:
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), isVector=True)
        image.geometry.apply_to_sitk(img)
        sitk.WriteImage(img, str(p))
    except RuntimeError as e:
        raise _err(p, f"SimpleITK cannot write a {arr.dtype} image with {arr.shape[0]} channel(s) as {_ext(p)}: "
                      f"{_short(e)}") from e


def _write_png(image: MedicalImage, p: Path) -> None:
    from PIL import Image

    arr = image.array
    c = arr.shape[0]
    if image.ndim != 2:
        raise _err(p, f"PNG holds 2D images; this one is {image.ndim}D (shape {arr.shape})")
    if arr.dtype == np.uint8 and c in (1, 3):
        pil = Image.fromarray(np.ascontiguousarray(arr[0] if c == 1 else np.moveaxis(arr, 0, -1)))
    elif arr.dtype == np.uint16 and c == 1:
        pil = Image.fromarray(np.ascontiguousarray(arr[0].astype(np.uint16)))
    else:
        raise _err(p, f"PNG needs uint8 with 1 or 3 channels or uint16 with 1 channel; got {arr.dtype} with {c} "
                      "channel(s) (convert the values explicitly first)")
    try:
        pil.save(p, format="PNG")
    except OSError as e:
        raise _err(p, f"cannot write PNG: {e}") from e


def _write_npz(image: MedicalImage, p: Path) -> None:
    g = image.geometry
    d = g.ndim
    direction = np.asarray(g.direction, dtype=np.float64).reshape(d, d)
    if d == 3:
        row, col, nrm = direction[:, 0], direction[:, 1], direction[:, 2]
        if not np.allclose(np.cross(row, col), nrm, atol=1e-6):
            raise _err(p, "the npz layout stores ImageOrientationPatient (row, column cosines) and derives the "
                          f"slice axis as row x column; this direction {g.direction} is not of that form "
                          "(left-handed or non-orthonormal): write .mha/.nii instead")
        orientation = np.concatenate([row, col])
    elif d == 2:
        orientation = direction.reshape(-1)
    else:
        raise _err(p, f"npz layout holds 2D or 3D images, got {d}D")
    arr = image.array[0] if image.num_channels == 1 else image.array
    np.savez_compressed(
        p,
        image=arr,
        spacing_zyx=np.asarray(g.spacing, dtype=np.float64),
        origin_xyz=np.asarray(g.origin, dtype=np.float64),
        orientation=orientation,
    )
