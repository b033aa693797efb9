"""COCO JSON (ground truth and detection results) <-> :class:`ImageAnnotation`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ...convert import boxes_to_xywh, xywh_to_boxes
from ._common import (
    AnnotationError,
    AnnotationReport,
    ImageAnnotation,
    PathLike,
    _Rows,
    _build,
    _check_labels,
    _image_path,
)


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
