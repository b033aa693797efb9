"""LIDC-IDRI reader XML: every reading session's marks, clustered into nodules across readers, with consensus.

An LIDC-IDRI series comes with one XML of (usually four) reading sessions, one per radiologist
(``servicingRadiologistID``). Each session holds three kinds of mark:

* ``nodule>=3mm``: an ``unblindedReadNodule`` with the nine characteristics and one contour (``roi``: ``edgeMap``
  points, ``inclusion`` TRUE for the outer boundary, FALSE for holes) per slice it spans;
* ``nodule<3mm``: an ``unblindedReadNodule`` without characteristics and a single point;
* ``non-nodule``: a ``nonNodule`` with one ``locus`` point.

Coordinates. ``xCoord``/``yCoord`` are the pixel column/row (0-based, centre of the pixel), ``imageZposition`` the
slice position in mm. A mark's pixel box ``x_min, y_min, x_max, y_max`` is inclusive (min/max over its inclusion=TRUE
contour points, all slices), its z range the first and last contour slice. In world mm (DICOM LPS, identity
orientation as in LIDC's axial CTs): ``X = origin_x + col * spacing_x``, ``Y = origin_y + row * spacing_y``, ``Z`` the
slice position. On a volume whose slices are known (``z_positions``), the medetect box is half-open voxels
``(k_min, y_min, x_min, k_max + 1, y_max + 1, x_max + 1)``.

Clustering (:func:`cluster_lidc_marks`). The readers' ``nodule>=3mm`` marks are the same nodule when linked, directly
or through other marks (single linkage), by either rule: their 3D boxes in mm overlap (closed intervals on every axis),
or their centres lie within ``link_mm`` (5 mm). This is the rule the shared ``lidc-idri-slabs`` CSVs were made with;
pylidc clusters by contour distance instead, which gives the same groups for nodules of this size. A nodule's
consensus level is the number of distinct readers who marked it (1..4); its boxes are the union and the
coordinate-wise median of its marks' boxes, its centre the mean of its marks' box centres (mm), its malignancy (and
every characteristic) the median over marks.

Nothing is dropped silently: sessions without any mark, ``nodule>=3mm`` marks without an inclusion contour and
contours on images outside a given series and a contour repeated verbatim (same image, same points) are counted in
the :class:`LidcReport`; malformed elements are errors naming the file, the session and the mark.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ._common import AnnotationError, PathLike

__all__ = ["CHARACTERISTICS", "LidcRoi", "LidcMark", "LidcNodule", "LidcReport", "read_lidc_xml",
           "cluster_lidc_marks", "LidcGeometry"]

CHARACTERISTICS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
                   "spiculation", "texture", "malignancy")
LINK_MM = 5.0  # centres closer than this join one nodule (the rule of the shared lidc-idri-slabs CSVs)


@dataclass(frozen=True)
class LidcRoi:
    """One contour (or point) of a mark on one slice: ``points [P, 2]`` as (column x, row y) pixels."""

    z_mm: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass(frozen=True)
class LidcMark:
    """One reader's mark. ``kind``: ``nodule>=3mm`` | ``nodule<3mm`` | ``non-nodule``; ``characteristics``: the nine
    LIDC ratings (``nodule>=3mm`` only; missing ratings are absent from the dict)."""

    session: int
    reader_id: str
    kind: str
    mark_id: str
    rois: tuple[LidcRoi, ...]
    characteristics: dict[str, int] = field(default_factory=dict)

    def _included(self) -> list[LidcRoi]:
        rois = [r for r in self.rois if r.inclusion]
        return rois or list(self.rois)

    @property
    def box_px(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box ``(x_min, y_min, x_max, y_max)`` over the inclusion contours of every slice."""
        pts = np.concatenate([r.points for r in self._included()])
        lo, hi = pts.min(0), pts.max(0)
        return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])

    @property
    def z_range_mm(self) -> tuple[float, float]:
        z = [r.z_mm for r in self._included()]
        return min(z), max(z)

    @property
    def n_slices(self) -> int:
        return len({r.z_mm for r in self._included()})


@dataclass
class LidcReport:
    """What :func:`read_lidc_xml` met besides the marks (each also listed in ``events``)."""

    sessions: int = 0
    sessions_without_marks: int = 0
    marks_without_inclusion_contour: int = 0
    rois_outside_series: int = 0
    duplicate_rois: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class LidcGeometry:
    """In-plane origin ``(x, y)`` mm of pixel (0, 0)'s centre, pixel spacing ``(y, x)`` mm, and optionally the slice
    positions ``z_positions`` (mm, ascending) of a volume holding (part of) the series."""

    origin_xy: tuple[float, float]
    spacing_yx: tuple[float, float]
    z_positions: tuple[float, ...] | None = None

    def box_mm(self, box_px: Sequence[float], z_range: Sequence[float]) -> np.ndarray:
        """``(x_lo, y_lo, z_lo, x_hi, y_hi, z_hi)`` mm of an inclusive pixel box and a z range (pixel centres)."""
        x0, y0, x1, y1 = box_px
        ox, oy = self.origin_xy
        sy, sx = self.spacing_yx
        return np.array([ox + x0 * sx, oy + y0 * sy, z_range[0], ox + x1 * sx, oy + y1 * sy, z_range[1]])

    def slice_index(self, z_mm: float, tol: float = 1e-3) -> int | None:
        if self.z_positions is None:
            return None
        z = np.asarray(self.z_positions)
        k = int(np.argmin(np.abs(z - z_mm)))
        return k if abs(z[k] - z_mm) <= tol else None


@dataclass(frozen=True)
class LidcNodule:
    """Readers' ``nodule>=3mm`` marks clustered into one nodule (see the module docstring)."""

    cluster_id: str
    marks: tuple[LidcMark, ...]
    union_box_px: tuple[int, int, int, int]
    union_z_mm: tuple[float, float]
    median_box_px: tuple[float, float, float, float]
    median_z_mm: tuple[float, float]
    centre_mm: tuple[float, float, float]  # world (x, y, z) mm: the mean of the marks' box centres
    characteristics: dict[str, float]

    @property
    def n_readers(self) -> int:
        """Consensus level: distinct readers who marked this nodule."""
        return len({m.reader_id for m in self.marks})

    @property
    def malignancy(self) -> float | None:
        return self.characteristics.get("malignancy")

    def slab_box(self, geometry: LidcGeometry) -> tuple[np.ndarray | None, bool]:
        """(medetect box ``(z0, y0, x0, z1, y1, x1)`` in half-open voxels of the volume whose slices are
        ``geometry.z_positions``, or None when no contour lies on them; True when the nodule continues beyond them)."""
        ks = [geometry.slice_index(r.z_mm) for m in self.marks for r in m._included()]
        inside = [k for k in ks if k is not None]
        if not inside:
            return None, False
        x0, y0, x1, y1 = self.union_box_px
        box = np.array([min(inside), y0, x0, max(inside) + 1, y1 + 1, x1 + 1], dtype=np.float64)
        return box, len(inside) < len(ks)


def _tag(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    for c in el:
        if _tag(c) == name:
            return c
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _tag(c) == name]


def _text(el: ET.Element | None, default: str = "") -> str:
    return (el.text or "").strip() if el is not None else default


def _point(el: ET.Element, file: Path, where: str) -> tuple[int, int]:
    try:
        return int(float(_text(_child(el, "xCoord")))), int(float(_text(_child(el, "yCoord"))))
    except ValueError:
        raise AnnotationError(file, where, "a point without numeric xCoord/yCoord") from None


def _z(el: ET.Element, file: Path, where: str) -> float:
    try:
        return float(_text(_child(el, "imageZposition")))
    except ValueError:
        raise AnnotationError(file, where, "imageZposition is missing or not a number") from None


def read_lidc_xml(path: PathLike, *, series_sop_uids: Sequence[str] | None = None
                  ) -> tuple[list[LidcMark], LidcReport, dict[str, str]]:
    """All marks of an LIDC XML, in session order -> ``(marks, report, header)`` (``header``: ``series_uid``,
    ``study_uid``). ``series_sop_uids``: the series' image SOP UIDs, to count contours on images not in it."""
    file = Path(path)
    try:
        root = ET.parse(file).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such LIDC XML file") from None
    except ET.ParseError as e:
        raise AnnotationError(file, None, f"not valid XML ({e})") from None
    header = _child(root, "ResponseHeader")
    info = {"series_uid": _text(_child(header, "SeriesInstanceUid")) if header is not None else "",
            "study_uid": _text(_child(header, "StudyInstanceUID")) if header is not None else ""}
    known = set(series_sop_uids) if series_sop_uids is not None else None
    report, marks = LidcReport(), []
    sessions = _children(root, "readingSession")
    if not sessions:
        raise AnnotationError(file, None, "no readingSession element (is this an LIDC XML?)")
    for s_idx, sess in enumerate(sessions):
        report.sessions += 1
        reader = _text(_child(sess, "servicingRadiologistID"), f"session{s_idx}")
        n_before = len(marks)
        for nod in _children(sess, "unblindedReadNodule"):
            mid = _text(_child(nod, "noduleID"))
            where = f"session {s_idx} (reader {reader}), nodule {mid!r}"
            rois, seen = [], set()
            for roi in _children(nod, "roi"):
                sop = _text(_child(roi, "imageSOP_UID"))
                pts = np.array([_point(e, file, where) for e in _children(roi, "edgeMap")], dtype=np.int64).reshape(-1, 2)
                if len(pts) == 0:
                    continue
                key = (sop, _text(_child(roi, "inclusion")).upper(), pts.tobytes())
                if key in seen:  # several contours per image are normal (holes, lobes); the same one twice is not
                    report.duplicate_rois += 1
                    report.events.append((where, f"the same contour twice on image {sop}: kept once"))
                    continue
                seen.add(key)
                if known is not None and sop not in known:
                    report.rois_outside_series += 1
                    report.events.append((where, f"contour on image {sop}, which is not in the series"))
                rois.append(LidcRoi(_z(roi, file, where), sop, _text(_child(roi, "inclusion")).upper() == "TRUE", pts))
            if not rois:
                report.events.append((where, "a nodule mark without any contour point: kept out"))
                report.marks_without_inclusion_contour += 1
                continue
            ch_el = _child(nod, "characteristics")
            chars = {}
            if ch_el is not None:
                for name in CHARACTERISTICS:
                    t = _text(_child(ch_el, name))
                    if t:
                        chars[name] = int(float(t))
            big = bool(chars) or len(rois) > 1 or len(rois[0].points) > 1
            if big and not any(r.inclusion for r in rois):
                report.marks_without_inclusion_contour += 1
                report.events.append((where, "no inclusion=TRUE contour: its box uses the exclusion contours"))
            marks.append(LidcMark(s_idx, reader, "nodule>=3mm" if big else "nodule<3mm", mid, tuple(rois), chars))
        for non in _children(sess, "nonNodule"):
            mid = _text(_child(non, "nonNoduleID"))
            where = f"session {s_idx} (reader {reader}), non-nodule {mid!r}"
            locus = _child(non, "locus")
            if locus is None:
                raise AnnotationError(file, where, "a nonNodule without locus")
            roi = LidcRoi(_z(non, file, where), _text(_child(non, "imageSOP_UID")), True,
                          np.array([_point(locus, file, where)], dtype=np.int64))
            marks.append(LidcMark(s_idx, reader, "non-nodule", mid, (roi,)))
        if len(marks) == n_before:
            report.sessions_without_marks += 1
            report.events.append((f"session {s_idx} (reader {reader})", "no marks in this reading session"))
    return marks, report, info


def cluster_lidc_marks(marks: Sequence[LidcMark], geometry: LidcGeometry, *, prefix: str = "N",
                       link_mm: float = LINK_MM) -> list[LidcNodule]:
    """Cluster the ``nodule>=3mm`` marks into nodules (single linkage: 3D mm boxes overlap, or centres within
    ``link_mm``); clusters are numbered ``<prefix>01, <prefix>02, ...`` in the order of their first mark."""
    from scipy.sparse.csgraph import connected_components

    big = [m for m in marks if m.kind == "nodule>=3mm"]
    if not big:
        return []
    boxes = np.stack([geometry.box_mm(m.box_px, m.z_range_mm) for m in big])  # [M, 6] x, y, z lo then hi
    lo, hi = boxes[:, :3], boxes[:, 3:]
    overlap = ((lo[:, None] <= hi[None]) & (lo[None] <= hi[:, None])).all(-1)
    ctr = (lo + hi) / 2
    near = np.linalg.norm(ctr[:, None] - ctr[None], axis=-1) < link_mm
    _, comp = connected_components(overlap | near, directed=False)
    order = {c: i for i, c in enumerate(dict.fromkeys(comp.tolist()))}  # numbered by first appearance
    out = []
    for c, idx in sorted(order.items(), key=lambda t: t[1]):
        members = [big[i] for i in np.flatnonzero(comp == c)]
        px = np.array([m.box_px for m in members], dtype=np.float64)
        zr = np.array([m.z_range_mm for m in members], dtype=np.float64)
        union = (int(px[:, 0].min()), int(px[:, 1].min()), int(px[:, 2].max()), int(px[:, 3].max()))
        uz = (float(zr[:, 0].min()), float(zr[:, 1].max()))
        med = tuple(float(v) for v in np.median(px, axis=0))
        mz = (float(np.median(zr[:, 0])), float(np.median(zr[:, 1])))
        centres = np.stack([geometry.box_mm(m.box_px, m.z_range_mm) for m in members])  # [k, 6]
        chars = {}
        for name in CHARACTERISTICS:
            vals = [m.characteristics[name] for m in members if name in m.characteristics]
            if vals:
                chars[name] = float(np.median(vals))
        out.append(LidcNodule(f"{prefix}{idx + 1:02d}", tuple(members), union, uz, med, mz,
                              tuple(float(v) for v in ((centres[:, :3] + centres[:, 3:]) / 2).mean(0)), chars))
    return out
