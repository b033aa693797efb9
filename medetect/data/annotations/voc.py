"""Pascal VOC XML annotations (one file per image) <-> :class:`ImageAnnotation`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from ...convert import boxes_to_xyxy, xyxy_to_boxes
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
    _safe_relpath,
    _xml_text,
)


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
