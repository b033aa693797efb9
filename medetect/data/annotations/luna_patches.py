"""LUNA16-NODE21 patch folder: one 3D record per ``patches/<patch_id>.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...convert import Geometry
from ._common import (
    AnnotationError,
    AnnotationReport,
    ImageAnnotation,
    PathLike,
    _Rows,
    _build,
    _image_path,
    _int,
    _num,
    _open_csv,
)


def read_luna16_patches(
    root: PathLike, *, all_components: bool = False, label: str = "nodule", check_images: bool = True
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read the LUNA16-NODE21 patch folder -> one 3D record per patch (``patches/<patch_id>.npz``).

    Boxes are already medetect boxes (``z0,y0,x0,z1,y1,x1``, half-open voxels, per the README). By default the
    target-nodule box from ``patches.csv``; ``all_components=True`` gives every mask component from
    ``components.csv`` (per-box meta ``component`` and ``is_target``). ``image_shape`` = ``shape_z,y,x``.
    Image meta: ``patch_id``, ``seriesuid``, ``geometry`` (1 mm isotropic, identity direction, ``origin`` = world
    position of voxel (0,0,0)'s centre, exactly the README's ``X = origin_x + x``), ``truncated``,
    ``target_centre_xyz_mm``, ``target_equiv_diameter_mm``.
    """
    root = Path(root)
    pfile, cfile = root / "patches.csv", root / "components.csv"
    zyx = ("z0", "y0", "x0", "z1", "y1", "x1")
    _, it = _open_csv(pfile, ("patch_id", "seriesuid", "shape_z", "shape_y", "shape_x",
                              "origin_x", "origin_y", "origin_z") + zyx)
    patches: dict[str, dict] = {}
    for line, row in it:
        w = f"line {line}"
        pid = row["patch_id"]
        origin = tuple(_num(row[c], pfile, w, c) for c in ("origin_x", "origin_y", "origin_z"))
        centre = [row.get(f"target_centre_{a}_mm", "") for a in "xyz"]
        patches[pid] = {
            "image": _image_path(f"patches/{pid}.npz", root, pfile, w, check_images),
            "shape": tuple(_int(row[c], pfile, w, c) for c in ("shape_z", "shape_y", "shape_x")),
            "box": [_num(row[c], pfile, w, c) for c in zyx],
            "where": w,
            "meta": {
                "patch_id": pid,
                "seriesuid": row["seriesuid"],
                "geometry": Geometry((1.0, 1.0, 1.0), origin, (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                "truncated": bool(_int(row.get("truncated", "0") or "0", pfile, w, "truncated")),
                "target_centre_xyz_mm": tuple(_num(c, pfile, w, "target_centre") for c in centre) if all(centre) else None,
                "target_equiv_diameter_mm": _num(row["target_equiv_diameter_mm"], pfile, w, "target_equiv_diameter_mm")
                if row.get("target_equiv_diameter_mm") else None,
            },
        }
    groups = {pid: _Rows() for pid in patches}
    if all_components:
        file = cfile
        _, it = _open_csv(cfile, ("patch_id", "component", "is_target") + zyx)
        for line, row in it:
            w = f"line {line}"
            if row["patch_id"] not in patches:
                raise AnnotationError(cfile, w, f"patch {row['patch_id']!r} is not in patches.csv")
            groups[row["patch_id"]].add([_num(row[c], cfile, w, c) for c in zyx], label, w,
                                        component=_int(row["component"], cfile, w, "component"),
                                        is_target=bool(_int(row["is_target"], cfile, w, "is_target")))
        dtypes = {"component": np.int64, "is_target": bool}
    else:
        file = pfile
        for pid, p in patches.items():
            groups[pid].add(p["box"], label, p["where"])
        dtypes = {}
    report = AnnotationReport()
    anns = []
    for pid, p in patches.items():
        r = groups[pid]
        for k in dtypes:
            r.extra.setdefault(k, [])
        anns.append(_build(p["image"], r, 3, file, p["shape"], False, report, meta=p["meta"], extra_dtypes=dtypes))
    return anns, report
