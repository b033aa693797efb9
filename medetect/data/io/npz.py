"""``.npz`` volumes in the Lung-PET-CT-Dx sample layout: read and write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...convert import Geometry
from ..image import MedicalImage
from ._common import _err, _existing_file, _short


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
