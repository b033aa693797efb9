"""2D images through Pillow (PNG, JPEG, PGM/PPM, TIFF, BMP): read, and PNG write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...convert import Geometry
from ..image import MedicalImage, MedicalImageError
from ._common import _err, _existing_file, _ext, _short


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
