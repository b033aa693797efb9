"""DICOM series (a folder or a list of slice files) -> one 3D :class:`~medetect.data.image.MedicalImage`."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..image import MedicalImage, MedicalImageError
from ._common import DICOM_EXTENSIONS, _NON_DICOM_SUFFIXES, _err, _ext, _has_dicom_preamble
from .dicom import (
    _check_pixel_data,
    _check_voi,
    _dcmread,
    _decode,
    _dicom_meta,
    _finish_values,
    _floats,
    _modality_is_integral,
    _pixel_spacing,
    _slice_step,
    _stack_geometry,
    _values,
)


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
            + ". Pick one with --series-uid UID (Python: series_uid=)."
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
