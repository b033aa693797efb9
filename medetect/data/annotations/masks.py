"""Boxes from instance masks, and the DSB2018 nuclei layout read through them."""

from __future__ import annotations

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
from .voc import _read_id_list


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
