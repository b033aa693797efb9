"""LUNA16 CSV files: world-millimetre points (annotations, candidates, submissions) and their voxel boxes."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
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
    _write_csv,
)


# ============================================================================================ LUNA16


LUNA_SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
_LUNA_XYZ = ("coordX", "coordY", "coordZ")


def read_luna_csv(path: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``) or ``candidates.csv`` as a dict.

    Returns ``{seriesuid: (centres_xyz [N, 3] float64 world mm, values [N])}`` in first-seen order, where ``values``
    is ``diameter_mm`` (float64) for annotation files and ``class`` (int64, 0 or 1) for candidate files, whichever
    column the header has. A view of :func:`read_world_points` (kind ``"excluded"`` or ``"candidates"``), whose
    checks and messages (file and line) apply.

    Diameters must be >= 0, except exactly ``-1``: LUNA16's ``annotations_excluded.csv`` (and the phantoms of
    :mod:`medetect.data.phantoms`) write ``diameter_mm = -1`` for findings without a size -- non-nodules and findings
    that only some radiologists marked. Such rows are returned as they are (value ``-1.0``); they are excluded
    findings for the FROC (neither hits nor false positives), not objects with a size, and
    :func:`luna_csv_to_annotations` skips them (counted in ``skipped_other``). Any other negative diameter is an error.
    """
    header = csv_header(path)
    if "diameter_mm" in header:
        return read_world_points(path, "excluded").to_dict("diameters")
    if "class" in header:
        return read_world_points(path, "candidates").to_dict("labels")
    raise WorldPointsError(os.fspath(path), 1, f"needs a 'diameter_mm' or a 'class' column; the header has {header}")


def luna_csv_to_annotations(
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | WorldPoints,
    geometries: Mapping[str, Geometry],
    *,
    label: str = "nodule",
    image_shapes: Mapping[str, Sequence[int]] | None = None,
    clip: bool = False,
    source: str = "<luna rows>",
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """LUNA16 world nodules -> voxel-box records, one per scan in ``geometries`` (scans without nodules: 0 boxes).

    ``rows``: a :class:`WorldPoints` with diameters or ``{seriesuid: (centres_xyz [N, 3], diameters [N])}``
    (:func:`read_luna_csv`).

    Boxes are :func:`~medetect.convert.luna_to_boxes` (the mm cube circumscribing the sphere, in voxels, with the
    +0.5 voxel-centre offset handled there). ``image = seriesuid``. Rows of scans missing from ``geometries`` are not
    converted: each such scan is counted in ``report.skipped_other`` (per nodule), listed and logged. Zero diameters
    give zero-size boxes, which are skipped and reported; diameters of -1 (findings without a size, see
    :func:`read_luna_csv`) give no box and are counted in ``skipped_other``. ``image_shapes`` (array order) enables the bounds check.
    Meta: ``geometry``, per-box ``centres_xyz`` and ``diameter_mm``. ``rows`` with a candidate ``class`` column
    (integer values) are refused: candidates have no size.
    """
    if isinstance(rows, WorldPoints):
        if np.isnan(rows.diameters).any():
            raise TypeError(f"luna_csv_to_annotations: {rows.source} has points without diameters (candidates or marks)")
        rows = rows.to_dict("diameters")
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
            r.add(box, label, f"{uid} nodule {k}", centres_xyz=c[k], diameter_mm=dia[k])
        r.extra.setdefault("centres_xyz", [])
        r.extra.setdefault("diameter_mm", [])
        shape = image_shapes.get(uid) if image_shapes is not None else None
        ann = _build(uid, r, 3, source, shape, clip, report, meta={"geometry": geom},
                     extra_dtypes={"centres_xyz": np.float64, "diameter_mm": np.float64})
        ann.meta["centres_xyz"] = ann.meta["centres_xyz"].reshape(-1, 3)
        anns.append(ann)
    return anns, report


def annotations_to_luna(
    anns: Sequence[ImageAnnotation], geometries: Mapping[str, Geometry], *, with_scores: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Voxel-box records -> ``{seriesuid: (centres_xyz [N, 3], diameters [N])}`` via :func:`boxes_to_luna`.

    With ``with_scores`` the second array is the records' scores instead (for a submission). ``image`` is the uid.
    """
    out = {}
    for a in anns:
        if a.image not in geometries:
            raise ValueError(f"annotations_to_luna: no geometry for {a.image!r}")
        centres, dia = boxes_to_luna(a.boxes, geometries[a.image])
        if with_scores:
            if a.scores is None:
                raise ValueError(f"annotations_to_luna: {a.image!r} has no scores")
            dia = a.scores
        out[a.image] = (np.asarray(centres).reshape(-1, 3), np.asarray(dia, dtype=np.float64))
    return out


def write_luna_csv(annotations_world: Mapping[str, tuple[np.ndarray, np.ndarray]], path: PathLike) -> None:
    """Write ``{seriesuid: (centres_xyz [N, 3], diameters [N])}`` as ``seriesuid,coordX,coordY,coordZ,diameter_mm``.

    Inverse of :func:`read_luna_csv` (exact: numbers are written losslessly); :func:`write_world_points` does the
    writing. Use :func:`annotations_to_luna` to get the dict from voxel-box records.
    """
    points = WorldPoints.from_dict(annotations_world, "diameters", source="write_luna_csv", allow_unknown_diameter=True)
    write_world_points(path, points, "excluded")


def write_luna_submission(
    path: PathLike,
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | Sequence[ImageAnnotation] | WorldPoints,
    geometries: Mapping[str, Geometry] | None = None,
) -> None:
    """Write a LUNA16 submission CSV with exactly the columns ``seriesuid,coordX,coordY,coordZ,probability``.

    ``rows``: a :class:`WorldPoints` with scores, ``{seriesuid: (centres_xyz [N, 3] world mm, probabilities [N])}``,
    or records with voxel boxes and ``scores`` plus ``geometries`` (box centres go to world mm via
    :func:`boxes_to_luna`). Read back with :func:`read_luna_submission`.
    """
    if isinstance(rows, WorldPoints):
        write_world_points(path, rows, "marks")
        return
    if not isinstance(rows, Mapping):
        if geometries is None:
            raise ValueError("write_luna_submission: records need geometries to reach world coordinates")
        rows = annotations_to_luna(list(rows), geometries, with_scores=True)
    write_world_points(path, WorldPoints.from_dict(rows, "scores", source="write_luna_submission"), "marks")


def read_luna_submission(path: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a LUNA16 submission -> ``{seriesuid: (centres_xyz [N, 3], probabilities [N])}``.

    The header must be exactly ``seriesuid,coordX,coordY,coordZ,probability`` (the evaluation script's columns);
    the rows are read by :func:`read_world_points` (kind ``"marks"``).
    """
    header = csv_header(path)
    if tuple(header) != LUNA_SUBMISSION_COLUMNS:
        raise WorldPointsError(os.fspath(path), 1, f"columns must be exactly {list(LUNA_SUBMISSION_COLUMNS)}, got {header}")
    return read_world_points(path, "marks").to_dict("scores")


# ============================================================================================ one record for world points


#: The value column of each kind of LUNA16 point file (the first four columns are ``seriesuid,coordX,coordY,coordZ``).
POINT_KINDS = {"annotations": "diameter_mm", "excluded": "diameter_mm", "candidates": "class", "marks": "probability"}
_POINT_ARRAYS = ("seriesuids", "centres", "diameters", "scores", "labels", "lines")


class WorldPointsError(AnnotationError):
    """Bad point input. ``str(err)`` is ``"<source>, <word> <line>: <problem>"`` (``word`` is ``line`` for files,
    ``row`` for arrays); ``source``, ``line``, ``problem`` and ``word`` are attributes."""

    def __init__(self, source: str, line: int | None, problem: str, word: str = "line"):
        self.source, self.line, self.problem, self.word = str(source), line, problem, word
        self.file, self.where, self.message = self.source, None if line is None else f"{word} {line}", problem
        ValueError.__init__(self, f"{self.source if line is None else f'{self.source}, {word} {line}'}: {problem}")


@dataclass(frozen=True, eq=False)
class WorldPoints:
    """LUNA16-style points in world millimetres: annotations, excluded findings, candidates or CAD marks.

    Shape key: ``N`` points. One row per point, in file order; every array has first axis ``N``.

    * ``seriesuids`` ``[N]`` str; ``centres`` ``[N, 3]`` float64 world ``(x, y, z)`` mm (``coordX, coordY, coordZ``);
    * ``diameters`` ``[N]`` float64 mm: NaN where the source has no diameter (candidates, marks); ``-1`` is LUNA16's
      code for a finding without a size (``annotations_excluded.csv``), kept as it is;
    * ``scores`` ``[N]`` float64: the ``probability`` of a mark, NaN otherwise;
    * ``labels`` ``[N]`` int64: the ``class`` of ``candidates.csv`` (0/1), -1 otherwise;
    * ``lines`` ``[N]`` int64: 1-based line of each point in ``source`` (``word="line"``) or its 1-based row for
      arrays (``word="row"``), for error messages.
    """

    seriesuids: np.ndarray
    centres: np.ndarray
    diameters: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    lines: np.ndarray
    source: str = "<arrays>"
    word: str = "row"

    def __len__(self) -> int:
        return int(self.seriesuids.shape[0])

    def __getitem__(self, index) -> WorldPoints:
        """Subset by a bool mask ``[N]``, an index array or a slice (an int gives a one-point record)."""
        if isinstance(index, (int, np.integer)):
            index = np.array([index])
        return WorldPoints(*(getattr(self, k)[index] for k in _POINT_ARRAYS), self.source, self.word)

    @property
    def probabilities(self) -> np.ndarray:
        """``scores`` under the name of the LUNA16 submission column."""
        return self.scores

    def for_uid(self, uid: str) -> WorldPoints:
        return self[self.seriesuids == uid]

    def by_uid(self) -> dict[str, WorldPoints]:
        """``{seriesuid: points of that scan}`` in order of first appearance (one loop over scans, none over points)."""
        if len(self) == 0:
            return {}
        uniq, first, inverse = np.unique(self.seriesuids, return_index=True, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # points grouped by scan, file order kept inside a scan
        bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))
        groups = np.split(order, bounds[:-1])
        return {str(uniq[k]): self[groups[k]] for k in np.argsort(first, kind="stable")}

    def to_dict(self, value: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{seriesuid: (centres [n, 3], values [n])}`` with ``value`` one of ``diameters``, ``scores``, ``labels``
        (the dict shape older callers use)."""
        if value not in ("diameters", "scores", "labels"):
            raise ValueError(f"WorldPoints.to_dict: value must be 'diameters', 'scores' or 'labels', got {value!r}")
        return {u: (p.centres, getattr(p, value)) for u, p in self.by_uid().items()}

    @classmethod
    def from_arrays(cls, seriesuids, centres, *, diameters=None, scores=None, labels=None,
                    source: str = "<arrays>", allow_unknown_diameter: bool = False) -> WorldPoints:
        """Validated record from arrays (``seriesuids`` ``[N]`` or one uid for all, ``centres`` ``[N, 3]``);
        errors name ``source`` and the 1-based row. Omitted columns get their "not given" value (NaN, NaN, -1);
        a given diameter must be >= 0 (or exactly -1 with ``allow_unknown_diameter``), a given score finite."""
        c = np.asarray(centres, dtype=np.float64)
        c = c.reshape(0, 3) if c.size == 0 else c
        if c.ndim != 2 or c.shape[1] != 3:
            raise WorldPointsError(source, None, f"centres must have shape (N, 3), got {c.shape}")
        n = c.shape[0]
        uids = np.asarray(seriesuids, dtype=str)
        uids = np.full(n, uids.item()) if uids.ndim == 0 else uids.reshape(-1)
        uids = np.char.strip(uids) if uids.size else uids.astype(str)
        lines = np.arange(1, n + 1, dtype=np.int64)

        def column(v, name, fill, dtype):
            if v is None:
                return np.full(n, fill, dtype=dtype)
            a = np.asarray(v, dtype=dtype)
            a = a.reshape(0) if a.size == 0 else a
            if a.shape != (n,):
                raise WorldPointsError(source, None, f"{name} must have shape ({n},), got {a.shape}")
            return a

        if uids.shape != (n,):
            raise WorldPointsError(source, None, f"seriesuids must have shape ({n},), got {uids.shape}")
        diam = column(diameters, "diameters", np.nan, np.float64)
        score = column(scores, "scores", np.nan, np.float64)
        lab = column(labels, "labels", -1, np.int64)
        _check_points(uids, c, lines, source, "row")
        if diameters is not None:
            _check_diameters(diam, lines, source, "row", allow_unknown_diameter)
        if scores is not None:
            _check_scores(score, lines, source, "row")
        return cls(uids, c, diam, score, lab, lines, source, "row")

    @classmethod
    def from_dict(cls, rows: Mapping[str, tuple[np.ndarray, np.ndarray]], value: str, *, source: str = "<dict>",
                  allow_unknown_diameter: bool = False) -> WorldPoints:
        """Inverse of :meth:`to_dict`: ``{seriesuid: (centres [n, 3], values [n])}`` -> one record."""
        uids, cs, vs = [], [], []
        for uid, (c, v) in rows.items():
            c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
            v = np.asarray(v).reshape(-1)
            if len(c) != len(v):
                raise ValueError(f"{source}: {uid!r} has {len(c)} centres but {len(v)} {value}")
            uids.append(np.full(len(c), uid, dtype=object))
            cs.append(c)
            vs.append(v)
        cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))
        return cls.from_arrays(cat(uids, 0).astype(str), cat(cs, (0, 3)), source=source,
                               allow_unknown_diameter=allow_unknown_diameter, **{value: cat(vs, 0)})

    @classmethod
    def concat(cls, *points: WorldPoints) -> WorldPoints:
        """One record from several (rows in argument order; ``source`` and ``word`` of the first)."""
        if not points:
            return cls.from_arrays(np.zeros(0, dtype=str), np.zeros((0, 3)))
        arrays = [np.concatenate([getattr(p, k) for p in points]) for k in _POINT_ARRAYS]
        return cls(*arrays, points[0].source, points[0].word)


def hits(marks_xyz, centres, diameters, *, unknown_diameter: float = float("nan")) -> np.ndarray:
    """The LUNA16 hit test: is a mark strictly inside the sphere of a finding (``|mark - centre| < diameter / 2``)?

    Elementwise with numpy broadcasting: ``marks_xyz [..., 3]``, ``centres [..., 3]``, ``diameters [...]`` -> bool
    ``[...]``; for all pairs pass ``marks[:, None]``, ``centres[None]``, ``diameters[None]`` -> ``[M, N]``. The
    boundary is strict (a mark exactly on the sphere is not a hit), as in the official evaluation script, which
    compares ``dx*dx + dy*dy + dz*dz`` with ``(diameter / 2) ** 2``; the same arithmetic is done here, so the FROC
    stays bit-identical. A negative or NaN diameter (unknown size) is replaced by ``unknown_diameter``: the official
    FROC uses 10 mm (``evaluation.froc.UNKNOWN_DIAMETER_MM``); the default NaN makes such findings never hit.
    """
    m = np.asarray(marks_xyz, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    dia = np.asarray(diameters, dtype=np.float64)
    d = c - m  # [..., 3]
    dist2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    radius = np.where((dia < 0.0) | np.isnan(dia), unknown_diameter, dia) / 2.0
    return dist2 < radius * radius


# --------------------------------------------------------------------------------- the one CSV reader and writer


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _check_points(uids, xyz, lines, source, word):
    empty = np.char.str_len(uids) == 0 if uids.size else np.zeros(0, bool)
    if empty.any():
        raise WorldPointsError(source, int(lines[_first(empty)]), "empty seriesuid", word)
    bad = ~np.isfinite(xyz)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise WorldPointsError(source, int(lines[row]),
                               f"{_LUNA_XYZ[col]} is not a finite number ({float(xyz[row, col])!r})", word)


def _check_diameters(diam, lines, source, word, allow_unknown):
    nan = np.isnan(diam)
    if nan.any():
        raise WorldPointsError(source, int(lines[_first(nan)]), "diameter_mm is NaN", word)
    inf = np.isinf(diam)
    if inf.any():
        raise WorldPointsError(source, int(lines[_first(inf)]), "diameter_mm is infinite", word)
    negative = diam < 0
    if allow_unknown:
        negative &= diam != -1.0
    if negative.any():
        i = _first(negative)
        hint = (" (only -1, 'unknown', is allowed, in the excluded-findings file)" if allow_unknown
                else " (-1, 'unknown', is only allowed in the excluded-findings file)")
        raise WorldPointsError(source, int(lines[i]), f"negative diameter_mm {float(diam[i])!r}{hint}", word)


def _check_scores(prob, lines, source, word):
    nan = np.isnan(prob)
    if nan.any():
        raise WorldPointsError(source, int(lines[_first(nan)]), "probability is NaN", word)
    inf = np.isinf(prob)
    if inf.any():
        i = _first(inf)
        raise WorldPointsError(source, int(lines[i]), f"probability is infinite ({float(prob[i])!r})", word)


def _is_blank(row: list[str]) -> bool:
    return not any(field.strip() for field in row)


def _open_text(path: PathLike):
    source = os.fspath(path)
    try:
        return source, open(source, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise WorldPointsError(source, None, f"cannot open file ({exc.strerror})") from None


def csv_header(path: PathLike) -> list[str]:
    """The stripped fields of the first non-blank line of a CSV file (to choose a ``kind``)."""
    source, handle = _open_text(path)
    with handle:
        try:
            return next(([f.strip() for f in row] for row in csv.reader(handle) if not _is_blank(row)), [])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise WorldPointsError(source, None, f"unreadable CSV ({exc})") from None


def read_table(path: PathLike, columns: Sequence[str]) -> tuple[str, list[list[str]], np.ndarray]:
    """The named columns of a CSV file with a header line, found by name (order free, extra columns ignored):
    ``(source, [strings per column], lines [R] int64)``; blank lines skipped, fields stripped, UTF-8 (BOM allowed)."""
    source, handle = _open_text(path)
    with handle:
        reader = csv.reader(handle)
        header = None
        header_line = 0
        try:
            for row in reader:
                if not _is_blank(row):
                    header = [field.strip() for field in row]
                    header_line = reader.line_num
                    break
            if header is None:
                raise WorldPointsError(source, None, "empty file: expected a header line with the "
                                       f"columns {','.join(columns)}")
            missing = [c for c in columns if c not in header]
            if missing:
                raise WorldPointsError(source, header_line,
                                       f"missing column(s) {', '.join(missing)} in the header "
                                       f"{','.join(header)!r} (expected {','.join(columns)})")
            index = [header.index(c) for c in columns]
            need = max(index) + 1
            fields: list[list[str]] = [[] for _ in columns]
            lines: list[int] = []
            for row in reader:
                if _is_blank(row):
                    continue
                if len(row) < need:
                    raise WorldPointsError(source, reader.line_num,
                                           f"too few fields: {len(row)}, the header has {len(header)} "
                                           f"({','.join(header)})")
                for out, i in zip(fields, index):
                    out.append(row[i].strip())
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise WorldPointsError(source, reader.line_num, f"malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise WorldPointsError(source, None, f"not a UTF-8 text file ({exc.reason})") from None
    return source, fields, np.asarray(lines, dtype=np.int64)


def _parse_floats(strings: list[str], column: str, lines: np.ndarray, source: str) -> np.ndarray:
    if not strings:
        return np.zeros(0, dtype=np.float64)
    try:
        return np.asarray(strings, dtype=np.float64)
    except ValueError:
        pass
    for text, line in zip(strings, lines):  # error path only: find the first bad row
        try:
            float(text)
        except ValueError:
            what = "empty value" if text == "" else f"malformed number {text!r}"
            raise WorldPointsError(source, int(line), f"{what} in column {column!r}") from None
    raise WorldPointsError(source, None, f"cannot parse column {column!r} as numbers")


def read_world_points(path: PathLike, kind: str = "annotations") -> WorldPoints:
    """Read a LUNA16 point file: ``seriesuid,coordX,coordY,coordZ`` plus the column of ``kind``:

    * ``"annotations"`` (``annotations.csv``): ``diameter_mm``, >= 0;
    * ``"excluded"`` (``annotations_excluded.csv``): ``diameter_mm``, >= 0 or exactly -1 (a finding without a size);
    * ``"candidates"`` (``candidates.csv``): ``class``, 0 or 1 -> ``labels``;
    * ``"marks"`` (a submission / CAD marks): ``probability``, finite -> ``scores``.

    Columns are found by name (order free, extra columns ignored, as the official evaluation script does); blank
    lines are skipped. Errors (a missing file too) raise :class:`WorldPointsError` naming the file and the 1-based line.
    """
    if kind not in POINT_KINDS:
        raise ValueError(f"read_world_points: kind must be one of {sorted(POINT_KINDS)}, got {kind!r}")
    col = POINT_KINDS[kind]
    source, fields, lines = read_table(path, ("seriesuid",) + _LUNA_XYZ + (col,))
    uids = np.asarray(fields[0], dtype=str)
    xyz = np.stack([_parse_floats(fields[k + 1], name, lines, source) for k, name in enumerate(_LUNA_XYZ)], axis=1)
    values = _parse_floats(fields[4], col, lines, source)
    _check_points(uids, xyz, lines, source, "line")
    n = len(uids)
    diam, score, lab = np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
    if col == "diameter_mm":
        _check_diameters(values, lines, source, "line", kind == "excluded")
        diam = values
    elif col == "probability":
        _check_scores(values, lines, source, "line")
        score = values
    else:
        bad = (values != 0) & (values != 1)
        if bad.any():
            i = _first(bad)
            raise WorldPointsError(source, int(lines[i]), f"class must be 0 or 1, got {fields[4][i]!r}")
        lab = values.astype(np.int64)
    return WorldPoints(uids, xyz.reshape(-1, 3), diam, score, lab, lines, source, "line")


def write_world_points(path: PathLike, points: WorldPoints, kind: str = "annotations") -> None:
    """Write ``points`` as ``seriesuid,coordX,coordY,coordZ,<column of kind>`` (see :func:`read_world_points`).

    Inverse of :func:`read_world_points` (exact: numbers are written losslessly). ``marks`` writes the LUNA16
    submission header ``seriesuid,coordX,coordY,coordZ,probability``; its scores and centres must be finite.
    """
    if kind not in POINT_KINDS:
        raise ValueError(f"write_world_points: kind must be one of {sorted(POINT_KINDS)}, got {kind!r}")
    col = POINT_KINDS[kind]
    values = {"diameter_mm": points.diameters, "class": points.labels, "probability": points.scores}[col]
    finite = np.isfinite(points.centres).all(axis=1) & np.isfinite(np.asarray(values, dtype=np.float64))
    if not finite.all():
        i = _first(~finite)
        raise ValueError(f"write_world_points: {points.source}, {points.word} {int(points.lines[i])} "
                         f"(seriesuid {str(points.seriesuids[i])!r}) has a non-finite centre or {col}")
    rows = [[u, *map(_fmt, c), _fmt(v)]
            for u, c, v in zip(points.seriesuids.tolist(), points.centres.tolist(), np.asarray(values).tolist())]
    _write_csv(path, ("seriesuid",) + _LUNA_XYZ + (col,), rows)
