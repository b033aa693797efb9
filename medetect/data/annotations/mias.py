"""MIAS mammography ``Info.txt`` -> 2D :class:`ImageAnnotation` records."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

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
