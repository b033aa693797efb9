"""Shared parts of the annotation readers: the error and report types, :class:`ImageAnnotation`, number and path
checks, and the CSV helpers every CSV-based reader uses. The rules they implement are in :mod:`medetect.data.annotations`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np


logger = logging.getLogger("medetect.data.annotations")  # one logger for every format module

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
                    f"{tuple(int(s) for s in lim[i])}; set data.clip_boxes: true in the config (Python: clip=True) to clip it",
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
