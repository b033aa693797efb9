"""NIfTI, MetaImage (MHD/MHA) and NRRD through SimpleITK: header checks, read and write."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ...convert import Geometry
from ..image import MedicalImage
from ._common import _err, _existing_file, _ext, _short


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
