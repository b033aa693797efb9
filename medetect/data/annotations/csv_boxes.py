"""Generic box CSV files (one row per box, several column styles) <-> :class:`ImageAnnotation`."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...convert import reverse_axes
from ._common import (
    AnnotationError,
    AnnotationReport,
    ImageAnnotation,
    PathLike,
    _Rows,
    _build,
    _check_labels,
    _fmt,
    _image_path,
    _int,
    _num,
    _open_csv,
    _write_csv,
)


# header coordinate columns -> (columns as listed, whether they are ITK/xyxy order that must be reversed)
_CSV_STYLES = {
    "zyx3d": (("z0", "y0", "x0", "z1", "y1", "x1"), False),
    "xyz3d": (("xmin", "ymin", "zmin", "xmax", "ymax", "zmax"), True),
    "medetect": (("y0", "x0", "y1", "x1"), False),
    "xyxy": (("xmin", "ymin", "xmax", "ymax"), True),
}


def _detect_csv_style(header: Sequence[str], file) -> tuple[tuple[str, ...], bool]:
    found = [k for k, (cols, _) in _CSV_STYLES.items() if all(c in header for c in cols)]
    # a 3D header also holds the 2D names: prefer 3D
    if "zyx3d" in found:
        found.remove("medetect")
    if "xyz3d" in found:
        found.remove("xyxy")
    if not found:
        raise AnnotationError(
            file, "line 1 (header)",
            f"no box columns: expected y0,x0,y1,x1 or xmin,ymin,xmax,ymax (2D) or z0,y0,x0,z1,y1,x1 or "
            f"xmin,ymin,zmin,xmax,ymax,zmax (3D); the header has {list(header)}",
        )
    if len(found) > 1:
        raise AnnotationError(file, "line 1 (header)", f"ambiguous box columns {found}; pass columns=...")
    return _CSV_STYLES[found[0]]


def read_csv_boxes(
    path: PathLike,
    root: PathLike | None = None,
    *,
    columns: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    image_shapes: Mapping[str, Sequence[int]] | None = None,
    clip: bool = False,
    check_images: bool = True,
    where: Mapping[str, str] | None = None,
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read a generic box CSV ``image,<coords>,label[,score][,depth][,height,width]`` -> ``(records, report)``.

    Coordinate columns are detected from the header names (a 3D set wins over the 2D names it contains):

    * ``y0,x0,y1,x1`` / ``z0,y0,x0,z1,y1,x1``: the medetect convention, taken as is;
    * ``xmin,ymin,xmax,ymax`` / ``xmin,ymin,zmin,xmax,ymax,zmax``: xyxy / ITK order, same half-open edge coordinates,
      axes reversed (:func:`~medetect.convert.reverse_axes`); no +-1 is applied.

    ``columns`` names the ``2d`` coordinate columns explicitly, in medetect order (lo then hi, array-axis order).
    Rows are grouped per ``image`` in first-seen order. A row whose coordinates AND label are all empty declares an
    image with no boxes (a negative); partly empty rows are errors. A ``score`` column gives records ``scores`` (the
    plain prediction CSV). ``height,width`` (2D) / ``depth,height,width`` (3D) columns, or ``image_shapes``, give
    ``image_shape`` and enable the bounds check. Other columns are ignored. Image paths are checked like everywhere
    (inside ``root``; with ``root`` and ``check_images``: existing). Per-box meta: ``line`` (CSV line number).
    ``where`` keeps only the rows whose columns equal the given values (e.g. ``{"split": "train"}``; the columns
    must exist).
    """
    file = Path(path)
    header, rows = _open_csv(file, ("image", "label") + tuple(where or ()))
    if columns is not None:
        cols, rev = tuple(columns), False
        if len(cols) == 0 or len(cols) % 2:
            raise ValueError(f"read_csv_boxes: columns must name 2d coordinate columns, got {cols}")
        missing = [c for c in cols if c not in header]
        if missing:
            raise AnnotationError(file, "line 1 (header)", f"missing column(s) {missing}; the header has {header}")
    else:
        cols, rev = _detect_csv_style(header, file)
    d = len(cols) // 2
    shape_cols = ("depth", "height", "width")[3 - d:] if d <= 3 else ()
    has_shape = bool(shape_cols) and all(c in header for c in shape_cols)
    has_score = "score" in header
    report = AnnotationReport()
    groups: dict[str, dict] = {}
    for line, row in rows:
        if where and any(row[k] != v for k, v in where.items()):
            continue
        w = f"line {line}"
        image = _image_path(row["image"], root, file, w, check_images)
        g = groups.setdefault(image, {"rows": _Rows(), "scores": [], "shape": None})
        if has_shape:
            shape = tuple(_int(row[c], file, w, c) for c in shape_cols)
            if any(s <= 0 for s in shape):
                raise AnnotationError(file, w, f"image size must be positive, got {shape}")
            if g["shape"] is not None and g["shape"] != shape:
                raise AnnotationError(file, w, f"image {image!r} size {shape} differs from an earlier row's {g['shape']}")
            g["shape"] = shape
        cells = [row[c] for c in cols] + [row["label"]] + ([row["score"]] if has_score else [])
        if all(not c for c in cells):
            continue
        if not row["label"]:
            raise AnnotationError(file, w, "empty label")
        v = [_num(row[c], file, w, c) for c in cols]  # file order; reversed per image below when xyxy
        g["rows"].add(v, row["label"], w, line=line)
        if has_score:
            g["scores"].append(_num(row["score"], file, w, "score"))
    anns = []
    for image, g in groups.items():
        r = g["rows"]
        if rev:
            r.boxes = list(reverse_axes(np.asarray(r.boxes, dtype=np.float64).reshape(-1, 2 * d)))
        _check_labels(r.labels, classes, file, r.wheres)
        shape = g["shape"]
        if image_shapes is not None and image in image_shapes:
            shape = tuple(int(s) for s in image_shapes[image])
        r.extra.setdefault("line", [])
        anns.append(_build(image, r, d, file, shape, clip, report,
                           scores=g["scores"] if has_score else None, extra_dtypes={"line": np.int64}))
    return anns, report


def write_csv_boxes(anns: Sequence[ImageAnnotation], path: PathLike, *, style: str = "medetect") -> None:
    """Write records as a box CSV that :func:`read_csv_boxes` reads back exactly.

    Header: ``image``, the coordinate columns, ``label``, then ``score`` if any record has scores (then all must),
    then ``height,width`` / ``depth,height,width`` if every record has ``image_shape``. ``style='medetect'`` writes
    ``y0,x0,y1,x1`` (2D) / ``z0,y0,x0,z1,y1,x1`` (3D); ``style='xyxy'`` writes ``xmin,ymin,xmax,ymax`` (2D) /
    ``xmin,ymin,zmin,xmax,ymax,zmax`` (3D). A record with no boxes is written as one row with empty coordinates and
    label, so negatives survive the round trip. All records must have the same ``d`` (1..3 for the shape columns).
    """
    anns = list(anns)
    if not anns:
        raise ValueError("write_csv_boxes: nothing to write")
    d = anns[0].ndim
    if any(a.ndim != d for a in anns):
        raise ValueError("write_csv_boxes: all records must have the same number of dimensions")
    if style not in ("medetect", "xyxy") or d not in (2, 3):
        raise ValueError(f"write_csv_boxes: style must be 'medetect' or 'xyxy' and boxes 2D or 3D (got {style!r}, {d}D)")
    key = {("medetect", 2): "medetect", ("medetect", 3): "zyx3d", ("xyxy", 2): "xyxy", ("xyxy", 3): "xyz3d"}[(style, d)]
    cols, rev = _CSV_STYLES[key]
    with_score = any(a.scores is not None for a in anns)
    if with_score and any(a.scores is None for a in anns):
        raise ValueError("write_csv_boxes: some records have scores and some do not")
    with_shape = all(a.image_shape is not None for a in anns)
    shape_cols = ("depth", "height", "width")[3 - d:]
    header = ["image", *cols, "label"] + (["score"] if with_score else []) + (list(shape_cols) if with_shape else [])
    out = []
    for a in anns:
        shape = [str(s) for s in a.image_shape] if with_shape else []
        boxes = reverse_axes(a.boxes) if rev else a.boxes
        if len(a) == 0:
            out.append([a.image, *[""] * len(cols), ""] + ([""] if with_score else []) + shape)
        for k, (b, lab) in enumerate(zip(boxes.tolist(), a.labels)):
            out.append([a.image, *map(_fmt, b), lab] + ([_fmt(a.scores[k])] if with_score else []) + shape)
    _write_csv(path, header, out)
