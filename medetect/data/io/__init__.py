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

One module per backend: :mod:`.pillow`, :mod:`.dicom` (single files), :mod:`.dicom_series`, :mod:`.itk` (SimpleITK:
NIfTI, MetaImage, NRRD), :mod:`.npz`; shared extensions and helpers in :mod:`._common`. Every name is re-exported here.

Array and geometry conventions are those of :mod:`medetect.convert`: arrays in numpy axis order (``z, y, x``), channels
first, spacing per array axis, origin/direction in ITK/DICOM LPS world ``(x, y, z)`` millimetres.
"""


from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..image import MedicalImage, MedicalImageError  # noqa: F401
from ._common import (  # noqa: F401
    DICOM_EXTENSIONS,
    NPZ_EXTENSIONS,
    PILLOW_EXTENSIONS,
    READ_EXTENSIONS,
    SITK_EXTENSIONS,
    WRITE_EXTENSIONS,
    _NON_DICOM_SUFFIXES,
    _err,
    _existing_file,
    _ext,
    _has_dicom_preamble,
    _short,
)
from .pillow import _pil_frame, _ppm_maxval, _write_png, read_pillow  # noqa: F401
from .dicom import (  # noqa: F401
    _VOI_CHOICES,
    _check_pixel_data,
    _check_voi,
    _dcmread,
    _decode,
    _dicom_meta,
    _finish_values,
    _floats,
    _geometry3,
    _has_modality_transform,
    _is_integral,
    _modality_is_integral,
    _multiframe_geometry,
    _output_dtype,
    _pixel_helpers,
    _pixel_spacing,
    _promote_shared_rescale,
    _slice_step,
    _stack_geometry,
    _stored_range,
    _values,
    read_dicom,
)
from .dicom_series import _series_files, read_dicom_series  # noqa: F401
from .itk import _MET_SIZES, _SITK_FORMATS, _check_metaio, _check_nifti, _write_sitk, read_sitk  # noqa: F401
from .npz import _write_npz, read_npz  # noqa: F401

__all__ = [
    "is_dicom",
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




def is_dicom(path: str | os.PathLike) -> bool:
    """Whether :func:`read_image` reads ``path`` as DICOM: a folder (a series), a ``.dcm .dicom .ima`` file, or a
    file of another (or no) extension, not one of the other readers', with the ``DICM`` preamble."""
    p = Path(path)
    if p.is_dir():
        return True
    ext = _ext(p)
    if ext in DICOM_EXTENSIONS:
        return True
    return ext not in PILLOW_EXTENSIONS + SITK_EXTENSIONS + NPZ_EXTENSIONS and p.is_file() and _has_dicom_preamble(p)


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
    if is_dicom(p):
        return read_dicom(p, **kw)
    raise _err(
        p,
        f"unsupported extension {ext or '(none)'!r} and no DICOM preamble; supported: "
        f"{', '.join(READ_EXTENSIONS)}, DICOM files of any name, or a DICOM folder",
    )


# ============================================================================================== Pillow




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


