"""Annotation files <-> :class:`ImageAnnotation` records in the medetect box convention.

Every reader here turns one file format into ``ImageAnnotation`` records whose ``boxes`` are ``[N, 2d]`` float64,
``(lo_1..lo_d, hi_1..hi_d)`` in ARRAY-AXIS order (2D ``(y0, x0, y1, x1)``, 3D ``(z0, y0, x0, z1, y1, x1)``), voxel units,
half-open (voxel ``i`` covers ``[i, i + 1)``). Conversions between conventions are delegated to :mod:`medetect.convert`.

Shape key: ``N`` boxes of one image, ``d`` spatial dimensions, ``M`` images.

Rules shared by all readers (each one is a decision; the format-specific ones are in each reader's docstring):

* **Errors name their place.** Bad input raises :class:`AnnotationError` (a ``ValueError``) whose message starts with
  the annotation file and the place in it: ``"line 7"`` (1-based physical line of a CSV/text file, the header is line 1),
  ``"<object> #3"`` (1-based ordinal of a VOC ``<object>`` element) or ``"annotations[12]"`` (0-based JSON index,
  as JSON tools print it). Missing columns, malformed or non-finite numbers, ``max < min``, unknown labels (when a
  class list is given), unknown ids, boxes outside a known image size (unless ``clip=True``), annotation paths that
  escape the dataset root, and annotations naming a missing image are all errors.
* **Zero-size boxes are skipped, never silently.** A box with ``hi == lo`` on some axis (after clipping) is dropped,
  counted in :attr:`AnnotationReport.skipped_zero_size`, listed in :attr:`AnnotationReport.events` as
  ``(file, where, reason)`` and logged at WARNING by the ``medetect.data.annotations`` logger. Each reader that builds
  ``ImageAnnotation`` records returns its report as the LAST element of its result.
* **Clipping is opt-in** (``clip=True``; MIAS is the one exception, see :func:`read_mias`): a box reaching outside
  ``[0, size]`` on an axis whose size is known is clipped, counted in :attr:`AnnotationReport.clipped` and logged.
  Without ``clip`` it is an error.
* **Annotation paths stay inside the root.** A path read from an annotation (VOC ``<filename>``, COCO ``file_name``,
  a CSV ``image`` cell, DSB2018 ``file``) must be relative and must not climb out of the dataset root after
  normalisation (``../../etc/passwd``, ``/etc/passwd``, ``C:\\x`` and ``a/../../x`` are rejected). The check is
  lexical (like a zip-slip check); symbolic links inside the root are the dataset owner's business. Paths are stored
  POSIX-style, normalised, relative to the root. When a ``root`` is given and ``check_images=True`` (the default),
  the image file must exist.
* **Per-box metadata** lives in ``meta`` as ``np.ndarray`` whose first axis has length ``N`` (e.g.
  ``meta['difficult']``); :meth:`ImageAnnotation.select` subsets exactly those entries. Image-level metadata uses
  scalars, strings, tuples, lists or other objects (e.g. a :class:`~medetect.convert.Geometry`).
* Writers print numbers losslessly: integral values as integers, others with Python's shortest round-trip ``repr``,
  so that ``read(write(x)) == x`` exactly.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..convert import (
    Geometry,
    boxes_to_luna,
    boxes_to_xywh,
    boxes_to_xyxy,
    luna_to_boxes,
    reverse_axes,
    xywh_to_boxes,
    xyxy_to_boxes,
)

__all__ = [
    "AnnotationError",
    "AnnotationReport",
    "ImageAnnotation",
    "read_voc",
    "read_voc_folder",
    "write_voc",
    "read_coco",
    "write_coco",
    "write_coco_results",
    "read_coco_results",
    "read_luna_csv",
    "luna_csv_to_annotations",
    "annotations_to_luna",
    "write_luna_csv",
    "write_luna_submission",
    "read_luna_submission",
    "LUNA_SUBMISSION_COLUMNS",
    "MIAS_CLASSES",
    "read_mias",
    "read_csv_boxes",
    "write_csv_boxes",
    "boxes_from_instance_mask",
    "boxes_from_masks",
    "read_dsb2018",
    "read_lung_pet_ct_boxes",
    "read_luna16_patches",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


# ============================================================================================ errors and report


class AnnotationError(ValueError):
    """Bad annotation input. ``str(err)`` is ``"<file>: <where>: <message>"``; ``file`` and ``where`` are attributes."""

    def __init__(self, file: PathLike | None, where: str | None, message: str):
        self.file = str(file) if file is not None else None
        self.where = where
        self.message = message
        parts = [p for p in (self.file, where) if p]
        super().__init__(": ".join(parts + [message]))


@dataclass
class AnnotationReport:
    """What a reader did besides returning records.

    read: boxes kept (returned). images: records returned.
    skipped_zero_size: boxes dropped because ``hi == lo`` on some axis (after clipping).
    clipped: boxes clipped to the image (``clip=True``, or MIAS circles reaching past the border).
    skipped_other: boxes not converted for another stated reason (e.g. a LUNA16 row whose scan has no geometry).
    image_level: findings kept as image-level labels in ``meta`` because they have no location (MIAS).
    events: one ``(file, where, reason)`` per skipped / clipped box or image-level finding, in reading order.
    """

    read: int = 0
    images: int = 0
    skipped_zero_size: int = 0
    clipped: int = 0
    skipped_other: int = 0
    image_level: int = 0
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def _event(self, counter: str, file: PathLike, where: str, reason: str, level: int = logging.WARNING) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        self.events.append((str(file), where, reason))
        logger.log(level, "%s: %s: %s", file, where, reason)

    def merge(self, other: "AnnotationReport") -> "AnnotationReport":
        """Add ``other``'s counts and events into this report (in place) and return it."""
        for name in ("read", "images", "skipped_zero_size", "clipped", "skipped_other", "image_level"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.events.extend(other.events)
        return self

    def __str__(self) -> str:
        return (
            f"{self.images} images, {self.read} boxes read, {self.skipped_zero_size} zero-size skipped, "
            f"{self.clipped} clipped, {self.skipped_other} skipped (other), {self.image_level} image-level findings"
        )


# ============================================================================================ record type


def _axis_names(d: int) -> tuple[str, ...]:
    return {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}.get(d, tuple(f"axis{i}" for i in range(d)))


@dataclass
class ImageAnnotation:
    """The boxes of one image (or volume).

    image: path relative to the dataset root (POSIX separators) or an id (LUNA16 seriesuid, patient id).
    boxes: ``[N, 2d]`` float64, medetect convention (array-axis order, half-open voxel edges).
    labels: ``N`` class names.
    scores: ``[N]`` float64 for predictions, ``None`` for ground truth.
    image_shape: spatial shape in array order (``(H, W)``, ``(D, H, W)``) when known.
    meta: free-form; ``np.ndarray`` values with first axis ``N`` are per-box (see :meth:`select`).

    Validation (``ValueError`` naming the image): ``boxes`` is ``[N, 2d]`` with ``2d`` even and > 0, finite, and
    ``lo <= hi`` per axis; ``len(labels) == N``; ``scores`` is ``[N]`` and finite; ``image_shape`` has ``d`` positive
    integers. An empty ``boxes`` of any shape with 0 elements becomes ``[0, 2d]`` with ``d`` taken from
    ``image_shape`` (2 if unknown).
    """

    image: str
    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        who = f"ImageAnnotation({self.image!r})"
        if not isinstance(self.image, str) or not self.image:
            raise ValueError(f"ImageAnnotation.image must be a non-empty string, got {self.image!r}")
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if not shape or any(int(s) != s or s <= 0 for s in shape):
                raise ValueError(f"{who}: image_shape must be positive integers (array order), got {self.image_shape}")
            self.image_shape = tuple(int(s) for s in shape)
        b = np.asarray(self.boxes, dtype=np.float64)
        if b.size == 0 and b.ndim != 2:
            d = len(self.image_shape) if self.image_shape is not None else 2
            b = b.reshape(0, 2 * d)
        if b.ndim != 2 or b.shape[1] == 0 or b.shape[1] % 2:
            raise ValueError(f"{who}: boxes must have shape [N, 2d] (lo_1..lo_d, hi_1..hi_d), got {b.shape}")
        n, d = b.shape[0], b.shape[1] // 2
        if not np.isfinite(b).all():
            i = int(np.flatnonzero(~np.isfinite(b).all(1))[0])
            raise ValueError(f"{who}: boxes[{i}] is not finite: {b[i].tolist()}")
        inv = b[:, d:] < b[:, :d]
        if inv.any():
            i, a = (int(v) for v in np.argwhere(inv)[0])
            raise ValueError(f"{who}: boxes[{i}] = {b[i].tolist()} has hi < lo on axis {_axis_names(d)[a]}")
        if self.image_shape is not None and len(self.image_shape) != d:
            raise ValueError(f"{who}: image_shape {self.image_shape} has {len(self.image_shape)} axes but boxes are {d}D")
        self.boxes = b
        labels = list(self.labels)
        if len(labels) != n:
            raise ValueError(f"{who}: {len(labels)} labels for {n} boxes")
        if not all(isinstance(s, str) for s in labels):
            raise ValueError(f"{who}: labels must be strings, got {[type(s).__name__ for s in labels][:5]}")
        self.labels = labels
        if self.scores is not None:
            s = np.asarray(self.scores, dtype=np.float64)
            if s.shape != (n,):
                raise ValueError(f"{who}: scores must have shape [{n}] (one per box), got {s.shape}")
            if not np.isfinite(s).all():
                raise ValueError(f"{who}: scores must be finite")
            self.scores = s
        if not isinstance(self.meta, dict):
            raise ValueError(f"{who}: meta must be a dict, got {type(self.meta).__name__}")

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions ``d``."""
        return self.boxes.shape[1] // 2

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def select(self, keep) -> "ImageAnnotation":
        """A copy holding only the boxes picked by ``keep`` (bool mask or indices), with per-box meta subset too."""
        idx = np.arange(len(self))[np.asarray(keep)]
        meta = {
            k: (v[idx] if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == len(self) else v)
            for k, v in self.meta.items()
        }
        return ImageAnnotation(
            self.image,
            self.boxes[idx],
            [self.labels[i] for i in idx],
            None if self.scores is None else self.scores[idx],
            self.image_shape,
            meta,
        )


# ============================================================================================ shared helpers


def _num(text: str | None, file: PathLike, where: str, what: str) -> float:
    """Parse a finite number or raise an AnnotationError naming ``what`` and its place."""
    if text is None:
        raise AnnotationError(file, where, f"{what} is missing")
    s = text.strip()
    try:
        v = float(s)
    except ValueError:
        raise AnnotationError(file, where, f"{what}: {s!r} is not a number") from None
    if not math.isfinite(v):
        raise AnnotationError(file, where, f"{what}: {s!r} is not a finite number")
    return v


def _int(text: str | None, file: PathLike, where: str, what: str) -> int:
    v = _num(text, file, where, what)
    if not v.is_integer():
        raise AnnotationError(file, where, f"{what}: {text!r} is not an integer")
    return int(v)


def _fmt(v) -> str:
    """Lossless text for a number: an integer when integral, else the shortest round-trip repr."""
    f = float(v)
    if f.is_integer() and abs(f) < 2**53:
        return str(int(f))
    return repr(f)


def _safe_relpath(rel: str, file: PathLike, where: str) -> str:
    """Normalise an annotation path; reject absolute paths and paths that climb out of the root."""
    if not isinstance(rel, str) or not rel.strip():
        raise AnnotationError(file, where, f"image path is empty or not a string: {rel!r}")
    s = rel.strip()
    win = PureWindowsPath(s)
    if s.startswith(("/", "\\")) or win.drive or win.is_absolute():
        raise AnnotationError(file, where, f"image path {s!r} is absolute; paths in annotations must be relative to the dataset root")
    norm = posixpath.normpath(s.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise AnnotationError(file, where, f"image path {s!r} escapes the dataset root")
    return norm


def _image_path(
    rel: str, root: PathLike | None, file: PathLike, where: str, check_images: bool
) -> str:
    norm = _safe_relpath(rel, file, where)
    if root is not None and check_images and not (Path(root) / norm).is_file():
        raise AnnotationError(file, where, f"image {norm!r} does not exist under the dataset root {str(root)!r}")
    return norm


def _check_labels(labels: Sequence[str], classes: Sequence[str] | None, file, wheres: Sequence[str]) -> None:
    if classes is None:
        return
    known = set(classes)
    for lab, w in zip(labels, wheres):
        if lab not in known:
            raise AnnotationError(file, w, f"unknown label {lab!r}; known classes: {list(classes)}")


def _finish_boxes(
    boxes: np.ndarray,
    wheres: Sequence[str],
    file: PathLike,
    shape: Sequence[int] | np.ndarray | None,
    clip: bool,
    report: AnnotationReport,
) -> np.ndarray:
    """Check boxes ``[N, 2d]`` read from ``file`` (one place string per box) and return the keep mask ``[N]``.

    Vectorised: raises for the first box with ``hi < lo``; for boxes outside ``shape`` (``[d]`` or per-box ``[N, d]``,
    array order) raises or, with ``clip``, clips IN PLACE and counts; then marks zero-size boxes as skipped.
    """
    n, d = boxes.shape[0], boxes.shape[1] // 2
    names = _axis_names(d)
    lo, hi = boxes[:, :d], boxes[:, d:]  # views [N, d]
    inv = hi < lo
    if inv.any():
        i, a = (int(v) for v in np.argwhere(inv)[0])
        raise AnnotationError(file, wheres[i], f"box has max < min on axis {names[a]} (medetect box {boxes[i].tolist()})")
    if shape is not None and n:
        lim = np.broadcast_to(np.asarray(shape, dtype=np.float64), (n, d))
        out = ((lo < 0) | (hi > lim)).any(1)
        if out.any():
            if not clip:
                i = int(np.flatnonzero(out)[0])
                raise AnnotationError(
                    file,
                    wheres[i],
                    f"box {boxes[i].tolist()} (array order {names}) lies outside the image of shape "
                    f"{tuple(int(s) for s in lim[i])}; pass clip=True to clip it",
                )
            for i in np.flatnonzero(out):
                before = boxes[i].tolist()
                np.clip(lo[i], 0, lim[i], out=lo[i])
                np.clip(hi[i], 0, lim[i], out=hi[i])
                report._event("clipped", file, wheres[i], f"box {before} clipped to {boxes[i].tolist()}")
    zero = (hi - lo <= 0).any(1)
    for i in np.flatnonzero(zero):
        report._event("skipped_zero_size", file, wheres[i], f"zero-size box {boxes[i].tolist()} skipped")
    report.read += int((~zero).sum())
    return ~zero


@dataclass
class _Rows:
    """Rows of one image collected while reading: boxes in medetect order, labels, places, per-box extras."""

    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    wheres: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, box, label: str, where: str, **extra) -> None:
        self.boxes.append(box)
        self.labels.append(label)
        self.wheres.append(where)
        for k, v in extra.items():
            self.extra.setdefault(k, []).append(v)


def _build(
    image: str,
    rows: _Rows,
    d: int,
    file: PathLike,
    shape,
    clip: bool,
    report: AnnotationReport,
    *,
    scores: Sequence[float] | None = None,
    meta: dict | None = None,
    extra_dtypes: Mapping[str, Any] | None = None,
) -> ImageAnnotation:
    """Validate the collected rows of one image and make its record (zero-size boxes skipped and reported)."""
    boxes = np.asarray(rows.boxes, dtype=np.float64).reshape(-1, 2 * d)
    keep = _finish_boxes(boxes, rows.wheres, file, shape, clip, report)
    meta = dict(meta or {})
    for k, vals in rows.extra.items():
        dt = (extra_dtypes or {}).get(k)
        meta[k] = np.asarray(vals, dtype=dt)[keep] if vals else np.zeros(0, dtype=dt)
    report.images += 1
    return ImageAnnotation(
        image,
        boxes[keep],
        [lab for lab, k in zip(rows.labels, keep) if k],
        None if scores is None else np.asarray(scores, dtype=np.float64)[keep],
        tuple(int(s) for s in shape) if shape is not None else None,
        meta,
    )


def _open_csv(path: PathLike, required: Sequence[str]) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Open a CSV file; check its header holds ``required``; yield ``(line_number, row_dict)`` per data row.

    Blank lines are skipped. A row with a different number of fields than the header is an error naming its line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # whole file: nothing stays open if the caller stops early
    except FileNotFoundError:
        raise AnnotationError(path, None, "file does not exist") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise AnnotationError(path, "line 1", "the file is empty (no header row)") from None
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise AnnotationError(path, "line 1 (header)", f"duplicate column(s) {dup}")
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationError(path, "line 1 (header)", f"missing column(s) {missing}; the header has {header}")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        start = reader.line_num + 1
        for rec in reader:
            line = start
            start = reader.line_num + 1
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) != len(header):
                raise AnnotationError(path, f"line {line}", f"{len(rec)} fields, but the header has {len(header)}")
            yield line, {h: c.strip() for h, c in zip(header, rec)}

    return header, rows()


def _write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


# ============================================================================================ Pascal VOC


def _xml_text(elem: ET.Element, tag: str, file, where: str, required: bool = True) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise AnnotationError(file, where, f"missing <{tag}>")
        return None
    return child.text.strip()


def read_voc(
    xml_path: PathLike,
    root: PathLike | None = None,
    *,
    one_based: bool = True,
    classes: Sequence[str] | None = None,
    clip: bool = False,
    image_dir: str = "JPEGImages",
    check_images: bool = True,
    report: AnnotationReport | None = None,
) -> tuple[ImageAnnotation, AnnotationReport]:
    """Read one Pascal VOC XML file -> ``(ImageAnnotation, report)``.

    Integer-box rule (``one_based=True``, the default): VOC ``xmin..xmax`` / ``ymin..ymax`` are 1-based INCLUSIVE
    pixel indices, so pixel columns ``xmin..xmax`` (1-based) are columns ``xmin-1 .. xmax-1`` (0-based), i.e. the
    half-open edge interval ``[xmin - 1, xmax)``: ``box = (ymin - 1, xmin - 1, ymax, xmax)``. This is the classic VOC
    devkit reading, and it fits BCCD exactly (its minima start at 1, its maxima reach 640/480, so every box lands in
    ``[0, 640] x [0, 480]``). ``one_based=False`` reads the four numbers as 0-based edge coordinates:
    ``box = (ymin, xmin, ymax, xmax)``. :func:`write_voc` inverts either rule exactly. Non-integer values are accepted.

    Zero size is judged on the RAW numbers in both modes: ``xmin == xmax`` or ``ymin == ymax`` is a degenerate box
    (BCCD's two "zero-area" RBC boxes are such points) and is skipped, counted and logged. Under ``one_based`` this
    also discards one-pixel-thin boxes, which labelling tools do not produce on purpose. ``xmax < xmin`` is an error.

    ``image`` is ``f"{image_dir}/{filename}"`` (normalised) when ``root`` is given, checked to stay inside ``root`` and
    (``check_images``) to exist; without ``root`` it is ``<filename>`` (still checked not to escape). ``<folder>`` and
    ``<path>`` are ignored (often stale). ``image_shape = (height, width)`` from ``<size>`` when present; boxes outside
    it are an error unless ``clip``. Per-box meta: ``difficult`` and ``truncated`` (bool arrays, missing -> False).
    Image meta: ``source`` (the XML path), ``filename``.
    """
    file = Path(xml_path)
    report = AnnotationReport() if report is None else report
    try:
        tree = ET.parse(file)
    except ET.ParseError as e:
        raise AnnotationError(file, "XML", f"not well-formed XML ({e})") from None
    except FileNotFoundError:
        raise AnnotationError(file, None, "annotation file does not exist") from None
    top = tree.getroot()
    if top.tag != "annotation":
        raise AnnotationError(file, f"<{top.tag}>", "root element must be <annotation>")
    filename = _xml_text(top, "filename", file, "<annotation>")
    rel = f"{image_dir}/{filename}" if root is not None and image_dir else filename
    image = _image_path(rel, root, file, "<filename>", check_images)

    shape = None
    size = top.find("size")
    if size is not None:
        w = _xml_text(size, "width", file, "<size>", required=False)
        h = _xml_text(size, "height", file, "<size>", required=False)
        if w is not None and h is not None:
            wi, hi = _int(w, file, "<size>/<width>", "width"), _int(h, file, "<size>/<height>", "height")
            if wi <= 0 or hi <= 0:
                raise AnnotationError(file, "<size>", f"image size must be positive, got width={wi} height={hi}")
            shape = (hi, wi)

    rows = _Rows()
    for k, obj in enumerate(top.findall("object"), start=1):
        where = f"<object> #{k}"
        name = _xml_text(obj, "name", file, where)
        _check_labels([name], classes, file, [where])
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationError(file, where, "missing <bndbox>")
        v = {t: _num(_xml_text(bnd, t, file, f"{where} <bndbox>"), file, f"{where} <bndbox>/<{t}>", t)
             for t in ("xmin", "ymin", "xmax", "ymax")}
        for a in ("x", "y"):
            if v[f"{a}max"] < v[f"{a}min"]:
                raise AnnotationError(file, where, f"{a}max {v[a + 'max']:g} < {a}min {v[a + 'min']:g}")
        flags = {}
        for t in ("difficult", "truncated"):
            s = _xml_text(obj, t, file, where, required=False)
            flags[t] = bool(_int(s, file, f"{where} <{t}>", t)) if s is not None else False
        if v["xmin"] == v["xmax"] or v["ymin"] == v["ymax"]:
            report._event(
                "skipped_zero_size", file, where,
                f"zero-area {name} box (xmin, ymin, xmax, ymax) = "
                f"({_fmt(v['xmin'])}, {_fmt(v['ymin'])}, {_fmt(v['xmax'])}, {_fmt(v['ymax'])}) skipped",
            )
            continue
        off = 1.0 if one_based else 0.0
        rows.add((v["xmin"] - off, v["ymin"] - off, v["xmax"], v["ymax"]), name, where, **flags)  # xyxy, edges
    rows.boxes = list(xyxy_to_boxes(np.asarray(rows.boxes, dtype=np.float64).reshape(-1, 4)))
    ann = _build(
        image, rows, 2, file, shape, clip, report,
        meta={"source": str(file), "filename": filename},
        extra_dtypes={"difficult": bool, "truncated": bool},
    )
    for key in ("difficult", "truncated"):
        ann.meta.setdefault(key, np.zeros(0, dtype=bool))
    return ann, report


def _read_id_list(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise AnnotationError(path, None, "split file does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            s = line.strip()
            if s:
                _safe_relpath(s, path, f"line {line_no}")
                out.append((line_no, s))
    return out


def read_voc_folder(
    voc_root: PathLike,
    split: str,
    *,
    one_based: bool = True,
    classes: Sequence[str] | None = None,
    clip: bool = False,
    check_images: bool = True,
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read a VOC layout: ids from ``ImageSets/Main/{split}.txt``, XML from ``Annotations/{id}.xml``.

    Images are ``JPEGImages/<filename>`` relative to ``voc_root``. See :func:`read_voc` for the box rule. A listed id
    without its XML is an error naming the split file and line.
    """
    root = Path(voc_root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    report = AnnotationReport()
    anns = []
    for line_no, ident in _read_id_list(split_file):
        xml = root / "Annotations" / f"{ident}.xml"
        if not xml.is_file():
            raise AnnotationError(split_file, f"line {line_no}", f"id {ident!r} has no annotation file {xml}")
        ann, _ = read_voc(xml, root, one_based=one_based, classes=classes, clip=clip,
                          check_images=check_images, report=report)
        anns.append(ann)
    return anns, report


def write_voc(ann: ImageAnnotation, path: PathLike, *, one_based: bool = True, depth: int | None = None) -> None:
    """Write one 2D record as Pascal VOC XML; :func:`read_voc` with the same ``one_based`` reads it back exactly.

    ``<filename>`` is the last component of ``ann.image`` and ``<folder>`` its parent (informative only).
    ``one_based=True`` writes ``xmin = x0 + 1, ymin = y0 + 1, xmax = x1, ymax = y1``. A box must then be MORE than
    one pixel wide and high (a 1-pixel box would be written as the degenerate point ``xmin == xmax`` that readers
    skip) and that is a ``ValueError``; with ``one_based=False`` a box must have non-zero size. Per-box meta
    ``difficult`` / ``truncated`` are written when present (else 0). Scores are not part of VOC and are not written.
    """
    if ann.ndim != 2:
        raise ValueError(f"write_voc: VOC holds 2D boxes; {ann.image!r} has {ann.ndim}D boxes")
    off = 1.0 if one_based else 0.0
    ext = ann.boxes[:, 2:] - ann.boxes[:, :2]
    bad = (ext <= off).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"write_voc: {ann.image!r} box {i} {ann.boxes[i].tolist()} is too small for VOC "
            f"({'one_based needs an extent > 1 px' if one_based else 'extent must be > 0'}); it would read back as a "
            "skipped zero-area box"
        )
    top = ET.Element("annotation")
    parent, _, name = ann.image.rpartition("/")
    ET.SubElement(top, "folder").text = parent
    ET.SubElement(top, "filename").text = name
    if ann.image_shape is not None:
        size = ET.SubElement(top, "size")
        ET.SubElement(size, "width").text = str(ann.image_shape[1])
        ET.SubElement(size, "height").text = str(ann.image_shape[0])
        ET.SubElement(size, "depth").text = str(depth if depth is not None else 3)
    ET.SubElement(top, "segmented").text = "0"
    flags = {k: np.asarray(ann.meta.get(k, np.zeros(len(ann), bool)), dtype=bool) for k in ("difficult", "truncated")}
    for i, (box, label) in enumerate(zip(boxes_to_xyxy(ann.boxes), ann.labels)):
        x0, y0, x1, y1 = box.tolist()
        obj = ET.SubElement(top, "object")
        ET.SubElement(obj, "name").text = label
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(flags["truncated"][i]))
        ET.SubElement(obj, "difficult").text = str(int(flags["difficult"][i]))
        bnd = ET.SubElement(obj, "bndbox")
        for tag, val in (("xmin", x0 + off), ("ymin", y0 + off), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bnd, tag).text = _fmt(val)
    ET.indent(top, space="\t")
    ET.ElementTree(top).write(path, encoding="utf-8", xml_declaration=False)


# ============================================================================================ COCO


def _load_json(path: PathLike):
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    except FileNotFoundError:
        raise AnnotationError(path, None, "file does not exist") from None


def _json_num(obj: Mapping, key: str, file, where: str) -> float:
    if key not in obj:
        raise AnnotationError(file, where, f"missing {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AnnotationError(file, where, f"{key!r} must be a finite number, got {v!r}")
    return float(v)


def _json_bbox(obj: Mapping, file, where: str) -> list[float]:
    bb = obj.get("bbox")
    if not isinstance(bb, (list, tuple)) or len(bb) != 4:
        raise AnnotationError(file, where, f"'bbox' must be [x, y, w, h], got {bb!r}")
    vals = []
    for v in bb:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AnnotationError(file, where, f"'bbox' must hold 4 finite numbers, got {bb!r}")
        vals.append(float(v))
    if vals[2] < 0 or vals[3] < 0:
        raise AnnotationError(file, where, f"'bbox' has a negative width or height: {bb!r}")
    return vals


def _categories_map(categories, file=None, where="categories") -> dict[int, str]:
    """id -> name from a COCO ``categories`` list (or an id -> name mapping)."""
    if isinstance(categories, Mapping):
        return {int(k): str(v) for k, v in categories.items()}
    out: dict[int, str] = {}
    if not isinstance(categories, (list, tuple)):
        raise AnnotationError(file, where, f"must be a list of {{'id', 'name'}} objects, got {type(categories).__name__}")
    for i, c in enumerate(categories):
        w = f"{where}[{i}]"
        if not isinstance(c, Mapping) or "id" not in c or "name" not in c:
            raise AnnotationError(file, w, "a category needs 'id' and 'name'")
        cid = int(_json_num(c, "id", file, w))
        if cid in out:
            raise AnnotationError(file, w, f"duplicate category id {cid}")
        if str(c["name"]) in out.values():
            raise AnnotationError(file, w, f"duplicate category name {c['name']!r}")
        out[cid] = str(c["name"])
    return out


def read_coco(
    json_path: PathLike,
    root: PathLike | None = None,
    *,
    classes: Sequence[str] | None = None,
    clip: bool = False,
    check_images: bool = True,
) -> tuple[list[ImageAnnotation], list[dict], AnnotationReport]:
    """Read a COCO detection JSON -> ``(records, categories, report)``; one record per ``images`` entry, in order.

    COCO ``bbox = [x, y, w, h]`` is continuous pixel-edge coordinates (the pycocotools convention: the box covers
    ``[x, x + w) x [y, y + h)``), so ``box = (y, x, y + h, x + w)`` via :func:`~medetect.convert.xywh_to_boxes`, no
    offset. ``image`` is ``file_name`` (checked to stay inside ``root``; with ``root`` and ``check_images`` it must
    exist), ``image_shape = (height, width)`` when both are given. Labels are category NAMES; ``categories`` is
    returned as in the file. A zero ``w`` or ``h`` is skipped and reported; a negative one is an error.
    Image meta: ``image_id``. Per-box meta: ``ann_id`` (int64), ``iscrowd`` (bool). If every annotation of the file
    has a ``score``, records carry ``scores`` (so files written by :func:`write_coco` from predictions round-trip).
    Places in messages are JSON indices such as ``annotations[12]`` (0-based).
    """
    file = Path(json_path)
    data = _load_json(file)
    if not isinstance(data, dict):
        raise AnnotationError(file, "top level", "a COCO file is a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(file, "top level", f"missing list {key!r}")
    cats = _categories_map(data["categories"], file)
    if classes is not None:
        _check_labels(list(cats.values()), classes, file, [f"categories[{i}]" for i in range(len(cats))])
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise AnnotationError(file, "top level", "'annotations' must be a list")
    report = AnnotationReport()

    images: dict[int, tuple[str, tuple | None]] = {}
    for i, im in enumerate(data["images"]):
        w = f"images[{i}]"
        if not isinstance(im, Mapping):
            raise AnnotationError(file, w, "an image entry must be an object")
        iid = _json_num(im, "id", file, w)
        if not iid.is_integer():
            raise AnnotationError(file, w, f"'id' must be an integer, got {im['id']!r}")
        iid = int(iid)
        if iid in images:
            raise AnnotationError(file, w, f"duplicate image id {iid}")
        if "file_name" not in im:
            raise AnnotationError(file, w, "missing 'file_name'")
        path = _image_path(str(im["file_name"]), root, file, w, check_images)
        shape = None
        if "width" in im and "height" in im:
            wd, ht = _json_num(im, "width", file, w), _json_num(im, "height", file, w)
            if wd <= 0 or ht <= 0 or not wd.is_integer() or not ht.is_integer():
                raise AnnotationError(file, w, f"width/height must be positive integers, got {im['width']!r}, {im['height']!r}")
            shape = (int(ht), int(wd))
        images[iid] = (path, shape)

    has_scores = bool(annotations) and all(isinstance(a, Mapping) and "score" in a for a in annotations)
    rows: dict[int, _Rows] = {iid: _Rows() for iid in images}
    scores: dict[int, list] = {iid: [] for iid in images}
    for i, a in enumerate(annotations):
        w = f"annotations[{i}]"
        if not isinstance(a, Mapping):
            raise AnnotationError(file, w, "an annotation must be an object")
        iid = _json_num(a, "image_id", file, w)
        if iid not in images:
            raise AnnotationError(file, w, f"image_id {a['image_id']!r} is not in 'images'")
        cid = _json_num(a, "category_id", file, w)
        if cid not in cats:
            raise AnnotationError(file, w, f"category_id {a['category_id']!r} is not in 'categories'")
        x, y, bw, bh = _json_bbox(a, file, w)
        rows[int(iid)].add((x, y, bw, bh), cats[int(cid)], w,  # xywh, converted per image below
                           ann_id=int(a.get("id", -1)), iscrowd=bool(a.get("iscrowd", 0)))
        if has_scores:
            scores[int(iid)].append(_json_num(a, "score", file, w))

    anns = []
    for iid, (path, shape) in images.items():
        r = rows[iid]
        r.boxes = list(xywh_to_boxes(np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4)))
        r.extra.setdefault("ann_id", [])
        r.extra.setdefault("iscrowd", [])
        anns.append(_build(path, r, 2, file, shape, clip, report,
                           scores=scores[iid] if has_scores else None, meta={"image_id": iid},
                           extra_dtypes={"ann_id": np.int64, "iscrowd": bool}))
    return anns, [dict(c) for c in data["categories"]], report


def _category_ids(categories, labels: Iterable[str]) -> tuple[dict[str, int], list[dict]]:
    """name -> id and the COCO ``categories`` list, from names (ids 1..K), dicts, a name->id map, or None (sorted)."""
    if categories is None:
        categories = sorted(set(labels))
    if isinstance(categories, Mapping):
        name_to_id = {str(k): int(v) for k, v in categories.items()}
    else:
        categories = list(categories)
        if all(isinstance(c, str) for c in categories):
            name_to_id = {c: i for i, c in enumerate(categories, start=1)}
        else:
            name_to_id = {v: k for k, v in _categories_map(categories).items()}
    cats = [{"id": cid, "name": name, "supercategory": "none"} for name, cid in name_to_id.items()]
    if len(set(name_to_id.values())) != len(name_to_id):
        raise ValueError(f"category ids must be unique, got {name_to_id}")
    return name_to_id, cats


def _image_ids(anns: Sequence[ImageAnnotation], image_ids) -> list[int]:
    if image_ids is None:
        ids = [a.meta.get("image_id") for a in anns]
        if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids) and len(set(ids)) == len(ids):
            return [int(i) for i in ids]
        return list(range(1, len(anns) + 1))
    if isinstance(image_ids, Mapping):
        missing = [a.image for a in anns if a.image not in image_ids]
        if missing:
            raise ValueError(f"image_ids has no id for image(s) {missing[:5]}")
        return [int(image_ids[a.image]) for a in anns]
    ids = [int(i) for i in image_ids]
    if len(ids) != len(anns):
        raise ValueError(f"image_ids has {len(ids)} ids for {len(anns)} records")
    return ids


def write_coco(anns: Sequence[ImageAnnotation], path: PathLike, categories=None, *, image_ids=None) -> list[dict]:
    """Write 2D records as a COCO detection JSON; :func:`read_coco` reads it back. Returns the ``categories`` written.

    ``categories``: names (ids 1..K in that order), COCO category dicts, a ``{name: id}`` map, or None (sorted
    unique labels, ids 1..K). Image ids: ``image_ids`` (map image -> id, or a sequence), else each record's
    ``meta['image_id']`` when all are unique integers, else 1..M. Each image gets ``file_name`` = ``ann.image`` and
    ``width``/``height`` from ``image_shape`` (required). Each box: ``bbox`` xywh (:func:`boxes_to_xywh`), ``area``
    ``w * h``, ``iscrowd`` (0, or ``meta['iscrowd']``), ids 1..; ``score`` too when the record has scores.
    """
    anns = list(anns)
    name_to_id, cats = _category_ids(categories, (lab for a in anns for lab in a.labels))
    ids = _image_ids(anns, image_ids)
    images, out = [], []
    for a, iid in zip(anns, ids):
        if a.ndim != 2:
            raise ValueError(f"write_coco: COCO holds 2D boxes; {a.image!r} has {a.ndim}D boxes")
        if a.image_shape is None:
            raise ValueError(f"write_coco: {a.image!r} has no image_shape; COCO images need width and height")
        images.append({"id": iid, "file_name": a.image, "height": a.image_shape[0], "width": a.image_shape[1]})
        xywh = boxes_to_xywh(a.boxes)
        crowd = np.asarray(a.meta.get("iscrowd", np.zeros(len(a), bool)), dtype=bool)
        for k, (bb, lab) in enumerate(zip(xywh.tolist(), a.labels)):
            if lab not in name_to_id:
                raise ValueError(f"write_coco: {a.image!r} box {k} has label {lab!r}, not in categories {list(name_to_id)}")
            rec = {"id": len(out) + 1, "image_id": iid, "category_id": name_to_id[lab], "bbox": bb,
                   "area": bb[2] * bb[3], "iscrowd": int(crowd[k])}
            if a.scores is not None:
                rec["score"] = float(a.scores[k])
            out.append(rec)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"images": images, "annotations": out, "categories": cats}, fh)
    return cats


def write_coco_results(preds: Sequence[ImageAnnotation], path: PathLike, image_ids=None, category_ids=None) -> None:
    """Write 2D predictions as a COCO results JSON ``[{image_id, category_id, bbox, score}, ...]``.

    The file is what ``pycocotools.coco.COCO.loadRes`` expects. ``image_ids``: map image -> COCO id, a sequence
    aligned with ``preds``, or None (each record's ``meta['image_id']``, as :func:`read_coco` sets it).
    ``category_ids``: a ``{name: id}`` map, the ``categories`` list of the ground truth, names (ids 1..K), or None
    (sorted unique labels). Every record must have ``scores``. Read back with :func:`read_coco_results`.
    """
    preds = list(preds)
    name_to_id, _ = _category_ids(category_ids, (lab for a in preds for lab in a.labels))
    if image_ids is None and not all(isinstance(a.meta.get("image_id"), (int, np.integer)) for a in preds):
        raise ValueError("write_coco_results: pass image_ids, or give every record an integer meta['image_id']")
    ids = _image_ids(preds, image_ids)
    out = []
    for a, iid in zip(preds, ids):
        if a.ndim != 2:
            raise ValueError(f"write_coco_results: {a.image!r} has {a.ndim}D boxes; COCO results are 2D")
        if a.scores is None:
            raise ValueError(f"write_coco_results: {a.image!r} has no scores")
        for k, (bb, lab, s) in enumerate(zip(boxes_to_xywh(a.boxes).tolist(), a.labels, a.scores.tolist())):
            if lab not in name_to_id:
                raise ValueError(f"write_coco_results: {a.image!r} box {k} label {lab!r} has no category id")
            out.append({"image_id": iid, "category_id": name_to_id[lab], "bbox": bb, "score": s})
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(out, fh)


def read_coco_results(
    json_path: PathLike, categories, image_names: Mapping[int, str] | None = None
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read a COCO results JSON -> ``(records with scores, report)``, one record per image id in first-seen order.

    ``categories``: the ground truth's ``categories`` list or an ``{id: name}`` map. ``image_names`` maps ids to
    image paths (default ``str(image_id)``); ``meta['image_id']`` keeps the id. Predictions of zero size are kept
    (they are predictions, not labels); negative sizes are errors.
    """
    file = Path(json_path)
    data = _load_json(file)
    if not isinstance(data, list):
        raise AnnotationError(file, "top level", "a COCO results file is a JSON list of detections")
    cats = _categories_map(categories)
    groups: dict[int, tuple[list, list, list]] = {}
    for i, r in enumerate(data):
        w = f"[{i}]"
        if not isinstance(r, Mapping):
            raise AnnotationError(file, w, "a detection must be an object")
        iid = _json_num(r, "image_id", file, w)
        cid = _json_num(r, "category_id", file, w)
        if cid not in cats:
            raise AnnotationError(file, w, f"category_id {r['category_id']!r} is unknown")
        x, y, bw, bh = _json_bbox(r, file, w)
        b, lab, s = groups.setdefault(int(iid), ([], [], []))
        b.append((x, y, bw, bh))
        lab.append(cats[int(cid)])
        s.append(_json_num(r, "score", file, w))
    report = AnnotationReport()
    anns = []
    for iid, (b, lab, s) in groups.items():
        name = image_names[iid] if image_names is not None and iid in image_names else str(iid)
        boxes = xywh_to_boxes(np.asarray(b, dtype=np.float64).reshape(-1, 4))
        anns.append(ImageAnnotation(name, boxes, lab, np.asarray(s), None, {"image_id": iid}))
        report.images += 1
        report.read += len(b)
    return anns, report


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


# ============================================================================================ MIAS


MIAS_CLASSES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")
_MIAS_TISSUE = ("F", "G", "D")
_MIAS_SEVERITY = ("B", "M")


def read_mias(
    path: PathLike,
    image_size: int = 1024,
    *,
    clip: bool = True,
    image_template: str = "images/{}.png",
    root: PathLike | None = None,
    check_images: bool = True,
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read MIAS abnormalities from a raw ``Info.txt`` (e.g. ``Info_subset.txt``) or the prepared ``annotations.csv``.

    The format is chosen by content: a first line starting with ``image_id,`` is the CSV, anything else Info.txt
    (``refnum tissue class [severity [x y radius | *NOTE ...*]]``, whitespace separated; blank and ``#`` lines skipped).

    Coordinates (decision): MIAS gives a centre ``(x, y)`` with the origin at the BOTTOM-left and y up, and an
    approximate radius. Like the mini-MIAS README we take ``cx = x`` and ``cy = (image_size - 1) - y`` (``1023 - y``)
    and use them directly as edge coordinates, so the box is the square circumscribing the circle,
    ``(cy - r, cx - r, cy + r, cx + r)`` in ``(y0, x0, y1, x1)``. Reading ``y`` as a bottom-up row index, the exact
    pixel-centre value would be ``cy + 0.5`` (and ``cx + 0.5``); we do NOT add it, so that both readers give the same
    numbers as the README and its ``annotations.csv`` (mdb005: x 477, y 133, r 30 -> (860, 447, 920, 507)). The
    half-pixel is far below the precision of an "approximate radius".
    Circles reaching past the border are CLIPPED to ``[0, image_size]`` by default (as the prepared CSV does),
    counted in ``report.clipped`` and logged; ``clip=False`` makes that an error. Zero radius -> zero-size skip.

    Records: one per image (first-seen order); Info.txt includes normal images (0 boxes); the CSV has rows for
    abnormal images only. ``image = image_template.format(refnum)`` (``root`` + ``check_images``: must exist);
    ``image_shape = (image_size, image_size)``. Labels are the abnormality class (``CIRC``, ``CALC``, ...).
    Per-box meta: ``severity`` (``'B'``/``'M'``), ``line`` (source line). Image meta: ``tissue`` (F/G/D, when known),
    ``split`` (CSV), ``image_label`` (``normal``/``benign``/``malignant``: the worst finding, located or not) and
    ``unlocated``: a list of ``{'abnormality', 'severity', 'note', 'line'}`` for findings WITHOUT a location
    (``mdb059``, ``mdb245``): kept as image-level labels, never dropped; each is counted in ``report.image_level``.
    """
    file = Path(path)
    if not file.is_file():
        raise AnnotationError(file, None, "file does not exist")
    with open(file, encoding="utf-8-sig") as fh:
        first = fh.readline()
    report = AnnotationReport()
    recs: dict[str, dict] = {}

    def rec(ref: str, where: str) -> dict:
        if ref not in recs:
            img = _image_path(image_template.format(ref), root, file, where, check_images)
            recs[ref] = {"image": img, "rows": _Rows(), "severity": [], "unlocated": [], "meta": {}}
        return recs[ref]

    def finding(ref, where, line_no, tissue, cls, sev, loc, note="", split=None, box=None):
        if cls not in MIAS_CLASSES:
            raise AnnotationError(file, where, f"unknown abnormality class {cls!r}; MIAS classes are {list(MIAS_CLASSES)}")
        if sev not in _MIAS_SEVERITY:
            raise AnnotationError(file, where, f"severity must be B or M, got {sev!r}")
        r = rec(ref, where)
        if tissue:
            r["meta"]["tissue"] = tissue
        if split:
            r["meta"]["split"] = split
        r["severity"].append(sev)
        if loc is None and box is None:
            r["unlocated"].append({"abnormality": cls, "severity": sev, "note": note, "line": line_no})
            report._event("image_level", file, where, f"{cls} {sev} has no location: kept as an image-level label",
                          level=logging.INFO)
            return
        if box is None:
            x, y, rad = loc
            if rad < 0:
                raise AnnotationError(file, where, f"radius must be >= 0, got {rad:g}")
            if not (0 <= x <= image_size and 0 <= y <= image_size):
                raise AnnotationError(file, where, f"centre ({x:g}, {y:g}) lies outside the {image_size}-pixel image")
            cx, cy = x, (image_size - 1) - y
            box = (cy - rad, cx - rad, cy + rad, cx + rad)
        r["rows"].add(box, cls, where, severity=sev, line=line_no)

    if first.startswith("image_id,"):
        _, rows = _open_csv(file, ("image_id", "abnormality", "severity", "has_location", "xmin", "ymin", "xmax", "ymax"))
        for line, row in rows:
            w = f"line {line}"
            ref = row["image_id"]
            has = _int(row["has_location"], file, w, "has_location")
            box = None
            if has:
                xmin, ymin, xmax, ymax = (_num(row[k], file, w, k) for k in ("xmin", "ymin", "xmax", "ymax"))
                box = (ymin, xmin, ymax, xmax)
            elif has != 0:
                raise AnnotationError(file, w, f"has_location must be 0 or 1, got {has}")
            finding(ref, w, line, row.get("tissue", ""), row["abnormality"], row["severity"], None, row.get("note", ""),
                    row.get("split"), box)
    else:
        with open(file, encoding="utf-8-sig") as fh:
            for line_no, text in enumerate(fh, start=1):
                f = text.split()
                if not f or f[0].startswith("#"):
                    continue
                w = f"line {line_no}"
                if len(f) < 3:
                    raise AnnotationError(file, w, f"expected 'refnum tissue class ...', got {text.strip()!r}")
                ref, tissue, cls = f[0], f[1], f[2]
                if tissue not in _MIAS_TISSUE:
                    raise AnnotationError(file, w, f"tissue must be one of {list(_MIAS_TISSUE)}, got {tissue!r}")
                if cls == "NORM":
                    if len(f) != 3:
                        raise AnnotationError(file, w, f"a NORM line has 3 fields, got {len(f)}")
                    rec(ref, w)["meta"]["tissue"] = tissue
                    continue
                if len(f) < 4:
                    raise AnnotationError(file, w, f"abnormality {cls!r} needs a severity (B or M)")
                sev = f[3]
                if len(f) == 4:
                    finding(ref, w, line_no, tissue, cls, sev, None)
                elif f[4].startswith("*"):
                    finding(ref, w, line_no, tissue, cls, sev, None, note=" ".join(f[4:]).strip("*").strip())
                elif len(f) == 7:
                    loc = (_num(f[4], file, w, "x"), _num(f[5], file, w, "y"), _num(f[6], file, w, "radius"))
                    finding(ref, w, line_no, tissue, cls, sev, loc)
                else:
                    raise AnnotationError(file, w, f"expected 'x y radius' after the severity, got {' '.join(f[4:])!r}")

    anns = []
    for ref, r in recs.items():
        sev = r["severity"]
        label = "malignant" if "M" in sev else "benign" if sev else "normal"
        meta = {**r["meta"], "refnum": ref, "image_label": label, "unlocated": r["unlocated"]}
        rows = r["rows"]
        rows.extra.setdefault("severity", [])
        rows.extra.setdefault("line", [])
        anns.append(_build(r["image"], rows, 2, file, (image_size, image_size), clip, report, meta=meta,
                           extra_dtypes={"severity": "<U1", "line": np.int64}))
    return anns, report


# ============================================================================================ generic CSV


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
    """
    file = Path(path)
    header, rows = _open_csv(file, ("image", "label"))
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


# ============================================================================================ masks -> boxes


def boxes_from_instance_mask(label_map) -> tuple[np.ndarray, np.ndarray]:
    """Instance label map ``[*spatial]`` (0 = background, k > 0 = instance k) -> ``(boxes [N, 2d], ids [N])``.

    Works for any ``d``. Boxes are the exact half-open bounds of each instance's voxels (``hi`` = last index + 1: the
    DSB2018 ``xmax = last column + 1`` rule), from ``scipy.ndimage.find_objects`` whose slices are exactly that.
    ``ids`` (int64, ascending) are the labels present. Accepts numpy arrays and CPU tensors of integer or bool dtype.
    Sparse large ids are compacted first, so memory does not grow with the largest id.
    """
    from scipy import ndimage

    a = np.asarray(label_map)
    if a.ndim == 0:
        raise ValueError("boxes_from_instance_mask: label_map must have at least one spatial axis")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"boxes_from_instance_mask: label_map must hold integer instance ids, got dtype {a.dtype}")
    d = a.ndim
    ids = np.unique(a)
    if ids.size and ids[0] < 0:
        raise ValueError(f"boxes_from_instance_mask: instance ids must be >= 0, found {ids[0]}")
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros((0, 2 * d)), np.zeros(0, dtype=np.int64)
    if ids[-1] > 2 * ids.size + 1024:  # sparse ids: relabel to 1..N so find_objects allocates N slots
        work = np.searchsorted(ids, a).astype(np.int64) + 1
        work[a == 0] = 0
        objs = ndimage.find_objects(work)
    else:
        objs = ndimage.find_objects(a.astype(np.int64, copy=False))
        objs = [objs[int(i) - 1] for i in ids]
    bounds = np.asarray([[s.start for s in sl] + [s.stop for s in sl] for sl in objs], dtype=np.float64)  # [N, 2d]
    return bounds, ids.astype(np.int64)


def boxes_from_masks(masks, *, allow_empty: bool = False) -> np.ndarray:
    """Binary masks ``[N, *spatial]`` -> tight half-open boxes ``[N, 2d]`` float64 (``hi`` = last index + 1).

    Vectorised over masks (one projection per axis). An empty mask has no box: a ``ValueError`` naming its indices,
    or, with ``allow_empty``, an all-zero box.
    """
    m = np.asarray(masks).astype(bool, copy=False)
    if m.ndim < 2:
        raise ValueError(f"boxes_from_masks: masks must have shape [N, *spatial], got {m.shape}")
    n, spatial = m.shape[0], m.shape[1:]
    d = len(spatial)
    lo = np.zeros((n, d))
    hi = np.zeros((n, d))
    nonempty = np.ones(n, dtype=bool)
    for ax in range(d):  # loop over axes, not over masks
        other = tuple(1 + k for k in range(d) if k != ax)
        proj = m.any(axis=other) if other else m  # [N, size_ax]
        has = proj.any(1)
        nonempty &= has
        lo[:, ax] = proj.argmax(1)
        hi[:, ax] = spatial[ax] - proj[:, ::-1].argmax(1)
    if not nonempty.all():
        if not allow_empty:
            raise ValueError(f"boxes_from_masks: mask(s) {np.flatnonzero(~nonempty).tolist()[:10]} are empty")
        lo[~nonempty] = 0
        hi[~nonempty] = 0
    return np.concatenate([lo, hi], axis=1)


# ============================================================================================ dataset readers


def read_dsb2018(
    root: PathLike, split: str = "train", *, clip: bool = False, check_images: bool = True
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read the DSB2018 nuclei folder (``images.csv``, ``boxes.csv``, ``{split}.txt``) -> ``(records, report)``.

    ``split``: ``'train'``, ``'val'`` or ``'all'`` (every row of ``images.csv``). Records follow the split file order.
    Boxes: ``(ymin, xmin, ymax, xmax)`` from ``boxes.csv`` as is (the README: already half-open pixel edges,
    ``xmax = last column + 1``). ``image`` is ``images.csv``'s ``file`` (inside ``root``, must exist with
    ``check_images``), ``image_shape = (height, width)``. Labels: the ``label`` column (``nucleus``). Per-box meta:
    ``instance`` and ``area_px`` (int64). Image meta: ``image_id``, ``split``, ``mode``. The ``n_boxes`` of
    ``images.csv`` must match the rows of ``boxes.csv`` (else an error naming the ``images.csv`` line).
    """
    root = Path(root)
    images_csv, boxes_csv = root / "images.csv", root / "boxes.csv"
    _, it = _open_csv(images_csv, ("image_id", "file", "width", "height", "n_boxes"))
    info: dict[str, dict] = {}
    for line, row in it:
        w = f"line {line}"
        info[row["image_id"]] = {
            "file": _image_path(row["file"], root, images_csv, w, check_images),
            "shape": (_int(row["height"], images_csv, w, "height"), _int(row["width"], images_csv, w, "width")),
            "n_boxes": _int(row["n_boxes"], images_csv, w, "n_boxes"),
            "line": line,
            "meta": {"image_id": row["image_id"], "split": row.get("split", ""), "mode": row.get("mode", "")},
        }
    if split == "all":
        ids = list(info)
    else:
        split_file = root / f"{split}.txt"
        ids = []
        for line, ident in _read_id_list(split_file):
            if ident not in info:
                raise AnnotationError(split_file, f"line {line}", f"image id {ident!r} is not in images.csv")
            ids.append(ident)
    wanted = set(ids)
    rows = {i: _Rows() for i in ids}
    _, it = _open_csv(boxes_csv, ("image_id", "label", "xmin", "ymin", "xmax", "ymax"))
    for line, row in it:
        w = f"line {line}"
        if row["image_id"] not in info:
            raise AnnotationError(boxes_csv, w, f"image id {row['image_id']!r} is not in images.csv")
        if row["image_id"] not in wanted:
            continue
        v = [_num(row[k], boxes_csv, w, k) for k in ("ymin", "xmin", "ymax", "xmax")]
        extra = {"instance": _int(row.get("instance", "-1") or "-1", boxes_csv, w, "instance"),
                 "area_px": _int(row.get("area_px", "-1") or "-1", boxes_csv, w, "area_px")}
        rows[row["image_id"]].add(v, row["label"], w, **extra)
    report = AnnotationReport()
    anns = []
    for i in ids:
        r, inf = rows[i], info[i]
        if len(r.boxes) != inf["n_boxes"]:
            raise AnnotationError(images_csv, f"line {inf['line']}",
                                  f"n_boxes = {inf['n_boxes']} but boxes.csv has {len(r.boxes)} rows for {i!r}")
        r.extra.setdefault("instance", [])
        r.extra.setdefault("area_px", [])
        anns.append(_build(inf["file"], r, 2, boxes_csv, inf["shape"], clip, report, meta=inf["meta"],
                           extra_dtypes={"instance": np.int64, "area_px": np.int64}))
    return anns, report


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
    ``center_xyz_mm`` (the CSV's world centre). ``image_shape`` from ``volumes.json``; boxes outside it are errors.
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
                (z0, y0, x0, z1 + 1, y1 + inc, x1 + inc), row["label"], w, center_xyz_mm=ctr)
        dtypes = {"center_xyz_mm": np.float64}
    report = AnnotationReport()
    anns = []
    for pid, r in groups.items():
        g, shape, v = geo[pid]
        meta = {"geometry": g, "volume_file": v.get("file"), "series_instance_uid": v.get("series_instance_uid")}
        anns.append(_build(pid, r, 3, file, shape, False, report, meta=meta, extra_dtypes=dtypes))
    return anns, report


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
