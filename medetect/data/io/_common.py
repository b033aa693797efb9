"""Extensions and small helpers shared by the image readers of :mod:`medetect.data.io`."""

from __future__ import annotations

import os
from pathlib import Path

from ..image import MedicalImageError


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
