"""LUNA16 CSV files: world-millimetre points (annotations, candidates, submissions) and their voxel boxes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...convert import Geometry, boxes_to_luna, luna_to_boxes
from ._common import (
    AnnotationError,
    AnnotationReport,
    ImageAnnotation,
    PathLike,
    _Rows,
    _build,
    _fmt,
    _int,
    _num,
    _open_csv,
    _write_csv,
)


# ============================================================================================ LUNA16


LUNA_SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
_LUNA_XYZ = ("coordX", "coordY", "coordZ")


def read_luna_csv(path: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``) or ``candidates.csv``.

    Returns ``{seriesuid: (centers_xyz [N, 3] float64 world mm, values [N])}`` in first-seen order, where ``values``
    is ``diameter_mm`` (float64) for annotation files and ``class`` (int64, 0 or 1) for candidate files, whichever
    column the header has. Errors name the file and line.

    Diameters must be >= 0, except exactly ``-1``: LUNA16's ``annotations_excluded.csv`` (and the phantoms of
    :mod:`medetect.data.phantoms`) write ``diameter_mm = -1`` for findings without a size -- non-nodules and findings
    that only some radiologists marked. Such rows are returned as they are (value ``-1.0``); they are excluded
    findings for the FROC (neither hits nor false positives), not objects with a size, and
    :func:`luna_csv_to_annotations` skips them (counted in ``skipped_other``). Any other negative diameter is an error.
    """
    file = Path(path)
    header, rows = _open_csv(file, ("seriesuid",) + _LUNA_XYZ)
    if "diameter_mm" in header:
        col, is_class = "diameter_mm", False
    elif "class" in header:
        col, is_class = "class", True
    else:
        raise AnnotationError(file, "line 1 (header)", f"needs a 'diameter_mm' or a 'class' column; the header has {header}")
    groups: dict[str, tuple[list, list]] = {}
    for line, row in rows:
        w = f"line {line}"
        uid = row["seriesuid"]
        if not uid:
            raise AnnotationError(file, w, "empty seriesuid")
        c = [_num(row[k], file, w, k) for k in _LUNA_XYZ]
        if is_class:
            v = _int(row[col], file, w, col)
            if v not in (0, 1):
                raise AnnotationError(file, w, f"class must be 0 or 1, got {v}")
        else:
            v = _num(row[col], file, w, col)
            if v < 0 and v != -1:
                raise AnnotationError(file, w, f"diameter_mm must be >= 0 (or -1 for a finding without a size), "
                                               f"got {v:g}")
        cs, vs = groups.setdefault(uid, ([], []))
        cs.append(c)
        vs.append(v)
    dt = np.int64 if is_class else np.float64
    return {u: (np.asarray(c, dtype=np.float64).reshape(-1, 3), np.asarray(v, dtype=dt)) for u, (c, v) in groups.items()}


def luna_csv_to_annotations(
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
    geometries: Mapping[str, Geometry],
    *,
    label: str = "nodule",
    image_shapes: Mapping[str, Sequence[int]] | None = None,
    clip: bool = False,
    source: str = "<luna rows>",
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """LUNA16 world nodules -> voxel-box records, one per scan in ``geometries`` (scans without nodules: 0 boxes).

    Boxes are :func:`~medetect.convert.luna_to_boxes` (the mm cube circumscribing the sphere, in voxels, with the
    +0.5 voxel-centre offset handled there). ``image = seriesuid``. Rows of scans missing from ``geometries`` are not
    converted: each such scan is counted in ``report.skipped_other`` (per nodule), listed and logged. Zero diameters
    give zero-size boxes, which are skipped and reported; diameters of -1 (findings without a size, see
    :func:`read_luna_csv`) give no box and are counted in ``skipped_other``. ``image_shapes`` (array order) enables the bounds check.
    Meta: ``geometry``, per-box ``centers_xyz`` and ``diameter_mm``. ``rows`` with a candidate ``class`` column
    (integer values) are refused: candidates have no size.
    """
    report = AnnotationReport()
    for uid, (c, v) in rows.items():
        if np.issubdtype(np.asarray(v).dtype, np.integer):
            raise TypeError(f"luna_csv_to_annotations: rows[{uid!r}] holds candidate classes, not diameters")
        if uid not in geometries:
            for k in range(len(v)):
                report._event("skipped_other", source, f"{uid} nodule {k}", "no geometry for this scan; not converted",
                              level=logging.INFO)
    anns = []
    for uid, geom in geometries.items():
        if geom.ndim != 3:
            raise ValueError(f"luna_csv_to_annotations: geometry of {uid!r} is {geom.ndim}D, LUNA16 is 3D")
        c, dia = rows.get(uid, (np.zeros((0, 3)), np.zeros(0)))
        c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
        dia = np.asarray(dia, dtype=np.float64).reshape(-1)
        r = _Rows()
        sized = dia >= 0  # -1: a finding without a size (annotations_excluded.csv), no box
        for k in np.flatnonzero(~sized):
            report._event("skipped_other", source, f"{uid} nodule {k}",
                          "diameter_mm -1 (finding without a size, e.g. a LUNA16 excluded non-nodule); no box",
                          level=logging.INFO)
        boxes = np.asarray(luna_to_boxes(c[sized], dia[sized], geom)).reshape(-1, 6)
        for k, box in zip(np.flatnonzero(sized), boxes):
            r.add(box, label, f"{uid} nodule {k}", centers_xyz=c[k], diameter_mm=dia[k])
        r.extra.setdefault("centers_xyz", [])
        r.extra.setdefault("diameter_mm", [])
        shape = image_shapes.get(uid) if image_shapes is not None else None
        ann = _build(uid, r, 3, source, shape, clip, report, meta={"geometry": geom},
                     extra_dtypes={"centers_xyz": np.float64, "diameter_mm": np.float64})
        ann.meta["centers_xyz"] = ann.meta["centers_xyz"].reshape(-1, 3)
        anns.append(ann)
    return anns, report


def annotations_to_luna(
    anns: Sequence[ImageAnnotation], geometries: Mapping[str, Geometry], *, with_scores: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Voxel-box records -> ``{seriesuid: (centers_xyz [N, 3], diameters [N])}`` via :func:`boxes_to_luna`.

    With ``with_scores`` the second array is the records' scores instead (for a submission). ``image`` is the uid.
    """
    out = {}
    for a in anns:
        if a.image not in geometries:
            raise ValueError(f"annotations_to_luna: no geometry for {a.image!r}")
        centers, dia = boxes_to_luna(a.boxes, geometries[a.image])
        if with_scores:
            if a.scores is None:
                raise ValueError(f"annotations_to_luna: {a.image!r} has no scores")
            dia = a.scores
        out[a.image] = (np.asarray(centers).reshape(-1, 3), np.asarray(dia, dtype=np.float64))
    return out


def write_luna_csv(annotations_world: Mapping[str, tuple[np.ndarray, np.ndarray]], path: PathLike) -> None:
    """Write ``{seriesuid: (centers_xyz [N, 3], diameters [N])}`` as ``seriesuid,coordX,coordY,coordZ,diameter_mm``.

    Inverse of :func:`read_luna_csv` (exact: numbers are written losslessly). Use :func:`annotations_to_luna` to get
    the dict from voxel-box records.
    """
    def rows():
        for uid, (c, d) in annotations_world.items():
            c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
            d = np.asarray(d, dtype=np.float64).reshape(-1)
            if len(c) != len(d):
                raise ValueError(f"write_luna_csv: {uid!r} has {len(c)} centres but {len(d)} diameters")
            for ci, di in zip(c.tolist(), d.tolist()):
                yield [uid, *map(_fmt, ci), _fmt(di)]

    _write_csv(path, ("seriesuid",) + _LUNA_XYZ + ("diameter_mm",), list(rows()))


def write_luna_submission(
    path: PathLike,
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | Sequence[ImageAnnotation],
    geometries: Mapping[str, Geometry] | None = None,
) -> None:
    """Write a LUNA16 submission CSV with exactly the columns ``seriesuid,coordX,coordY,coordZ,probability``.

    ``rows``: ``{seriesuid: (centers_xyz [N, 3] world mm, probabilities [N])}``, or records with voxel boxes and
    ``scores`` plus ``geometries`` (box centres go to world mm via :func:`boxes_to_luna`). Read back with
    :func:`read_luna_submission`.
    """
    if not isinstance(rows, Mapping):
        if geometries is None:
            raise ValueError("write_luna_submission: records need geometries to reach world coordinates")
        rows = annotations_to_luna(list(rows), geometries, with_scores=True)

    def lines():
        for uid, (c, p) in rows.items():
            c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            if len(c) != len(p):
                raise ValueError(f"write_luna_submission: {uid!r} has {len(c)} centres but {len(p)} probabilities")
            if not (np.isfinite(c).all() and np.isfinite(p).all()):
                raise ValueError(f"write_luna_submission: {uid!r} has non-finite values")
            for ci, pi in zip(c.tolist(), p.tolist()):
                yield [uid, *map(_fmt, ci), _fmt(pi)]

    _write_csv(path, LUNA_SUBMISSION_COLUMNS, list(lines()))


def read_luna_submission(path: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a LUNA16 submission -> ``{seriesuid: (centers_xyz [N, 3], probabilities [N])}``.

    The header must be exactly ``seriesuid,coordX,coordY,coordZ,probability`` (the evaluation script's columns).
    """
    file = Path(path)
    header, it = _open_csv(file, LUNA_SUBMISSION_COLUMNS)
    if tuple(header) != LUNA_SUBMISSION_COLUMNS:
        raise AnnotationError(file, "line 1 (header)", f"columns must be exactly {list(LUNA_SUBMISSION_COLUMNS)}, got {header}")
    groups: dict[str, tuple[list, list]] = {}
    for line, row in it:
        w = f"line {line}"
        if not row["seriesuid"]:
            raise AnnotationError(file, w, "empty seriesuid")
        c, p = groups.setdefault(row["seriesuid"], ([], []))
        c.append([_num(row[k], file, w, k) for k in _LUNA_XYZ])
        p.append(_num(row["probability"], file, w, "probability"))
    return {u: (np.asarray(c, dtype=np.float64).reshape(-1, 3), np.asarray(p, dtype=np.float64)) for u, (c, p) in groups.items()}
