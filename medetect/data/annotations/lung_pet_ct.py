"""Lung-PET-CT-Dx sample: tumour boxes as 3D voxel boxes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...convert import Geometry
from ._common import AnnotationError, AnnotationReport, ImageAnnotation, PathLike, _Rows, _build, _int, _num, _open_csv
from .coco import _load_json
from .luna import _LUNA_XYZ


def _geometry_from_dicom(spacing_zyx, origin_xyz, orientation) -> Geometry:
    """Geometry from DICOM ImageOrientationPatient (row and column cosines); slice axis = their cross product."""
    r = np.asarray(orientation[:3], dtype=np.float64)
    c = np.asarray(orientation[3:6], dtype=np.float64)
    direction = np.stack([r, c, np.cross(r, c)], axis=1)  # columns: ITK index axes i (col), j (row), k (slice)
    return Geometry(tuple(spacing_zyx), tuple(origin_xyz), tuple(direction.reshape(-1).tolist()))


def read_lung_pet_ct_boxes(
    root: PathLike, *, per_slice: bool = False, inplane_max_inclusive: bool = False
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read the Lung-PET-CT-Dx sample's tumour boxes as 3D voxel boxes, one record per patient.

    ``per_slice=False``: ``boxes_3d.csv`` -> ``(z0, y0, x0, z1 + 1, y1, x1)`` (the README mapping: ``z1`` is an
    inclusive slice index). ``per_slice=True``: every row of ``boxes_2d_per_slice.csv`` -> a one-slice-thick box
    ``(k, ymin, xmin, k + 1, ymax, xmax)`` with ``k = slice_index``; per-box meta ``slice_index``,
    ``annotated_on_shipped_series`` (bool), ``sop_instance_uid``. In-plane maxima are taken as exclusive edges, as the
    README's mapping does; ``inplane_max_inclusive=True`` adds 1 to them (then the box centre matches the README's
    ``coordX/Y/Z`` exactly). ``image`` = patient id (A0002 ships only as DICOM); meta: ``geometry``
    (:class:`Geometry` from ``volumes.json``), ``volume_file``, ``series_instance_uid``, and for the 3D boxes per-box
    ``centre_xyz_mm`` (the CSV's world centre). ``image_shape`` from ``volumes.json``; boxes outside it are errors.
    """
    root = Path(root)
    vols_file = root / "volumes.json"
    vols = _load_json(vols_file)
    geo = {}
    for pid, v in vols.items():
        try:
            geo[pid] = (_geometry_from_dicom(v["spacing_zyx_mm"], v["origin_xyz_mm_LPS"], v["image_orientation_patient"]),
                        tuple(v["shape_zyx"]), v)
        except (KeyError, TypeError, ValueError) as e:
            raise AnnotationError(vols_file, pid, f"bad volume entry ({e})") from None
    inc = 1.0 if inplane_max_inclusive else 0.0
    groups: dict[str, _Rows] = {}
    if per_slice:
        file = root / "boxes_2d_per_slice.csv"
        _, it = _open_csv(file, ("patient_id", "label", "slice_index", "xmin", "ymin", "xmax", "ymax"))
        for line, row in it:
            w = f"line {line}"
            k = _int(row["slice_index"], file, w, "slice_index")
            x0, y0, x1, y1 = (_num(row[c], file, w, c) for c in ("xmin", "ymin", "xmax", "ymax"))
            if row["patient_id"] not in geo:
                raise AnnotationError(file, w, f"patient {row['patient_id']!r} is not in volumes.json")
            groups.setdefault(row["patient_id"], _Rows()).add(
                (k, y0, x0, k + 1, y1 + inc, x1 + inc), row["label"], w, slice_index=k,
                annotated_on_shipped_series=bool(_int(row.get("annotated_on_shipped_series", "0") or "0", file, w,
                                                      "annotated_on_shipped_series")),
                sop_instance_uid=row.get("sop_instance_uid", ""))
        dtypes = {"slice_index": np.int64, "annotated_on_shipped_series": bool, "sop_instance_uid": object}
    else:
        file = root / "boxes_3d.csv"
        _, it = _open_csv(file, ("patient_id", "label", "z0", "y0", "x0", "z1", "y1", "x1"))
        for line, row in it:
            w = f"line {line}"
            z0, y0, x0, z1, y1, x1 = (_num(row[c], file, w, c) for c in ("z0", "y0", "x0", "z1", "y1", "x1"))
            if row["patient_id"] not in geo:
                raise AnnotationError(file, w, f"patient {row['patient_id']!r} is not in volumes.json")
            ctr = [_num(row[c], file, w, c) if row.get(c) else math.nan for c in _LUNA_XYZ]
            groups.setdefault(row["patient_id"], _Rows()).add(
                (z0, y0, x0, z1 + 1, y1 + inc, x1 + inc), row["label"], w, centre_xyz_mm=ctr)
        dtypes = {"centre_xyz_mm": np.float64}
    report = AnnotationReport()
    anns = []
    for pid, r in groups.items():
        g, shape, v = geo[pid]
        meta = {"geometry": g, "volume_file": v.get("file"), "series_instance_uid": v.get("series_instance_uid")}
        anns.append(_build(pid, r, 3, file, shape, False, report, meta=meta, extra_dtypes=dtypes))
    return anns, report
