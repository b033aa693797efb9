"""Detection mean average precision with the semantics of the PASCAL VOC devkit and of pycocotools, for any d.

Inputs (both evaluators)
    ``preds``: a list over images of dicts ``{"boxes": [D, 2d], "scores": [D], "labels": [D]}``;
    ``gts``: a list over the same images of dicts ``{"boxes": [G, 2d], "labels": [G]}`` with optional bool ``[G]``
    flags ``"difficult"``, ``"ignore"`` and ``"iscrowd"``. Torch tensors (any device) or numpy arrays. A missing
    ``"labels"`` means "all class 0" (single-class detectors). Boxes follow the medetect convention
    ``(lo_1..lo_d, hi_1..hi_d)``, array-axis order, half-open: a box's d-volume is ``prod(hi - lo)`` and IoU is
    :func:`medetect.boxes.box_iou` (no ``+1``), so 2D, 3D and any other d share one code path.

Classes
    ``class_names`` (or ``num_classes``) fixes the classes to ``0 .. K-1`` (labels outside raise). Without them the
    classes are the labels that occur in ``gts`` or ``preds``. A class with no (non-ignored) ground truth has AP
    ``nan`` and is left out of every mean (pycocotools reports -1 and leaves it out of the mean in the same way).

VOC (:func:`evaluate_voc`): the Python ``voc_eval`` of the devkit (py-faster-rcnn / Detectron), exactly:
    * per class, detections are ranked by decreasing score. We sort *stably* (ties keep image order, then input
      order); the devkit's ``np.argsort(-confidence)`` is an unstable quicksort, so its tie order is unspecified.
    * a detection's candidate is the ground truth of its class in its image with the largest IoU among ALL of them,
      matched or not, difficult or not (first one on ties, as ``np.argmax``). If that IoU ``> iou_threshold``
      (strictly, as ``voc_eval``'s ``ovmax > ovthresh``; the MATLAB ``VOCevaldet.m`` uses ``>=``, available as
      ``iou_inclusive=True``): a difficult candidate makes the detection neither TP nor FP; an unmatched one makes it
      a TP and marks the candidate matched; an already matched one makes it a FP (duplicate) -- even when another,
      unmatched ground truth also overlaps enough. Below the threshold (or no ground truth of that class): FP.
      Because the candidate does not depend on earlier matches, the "first detection in score order per candidate
      wins" rule is computed without any sequential loop (``np.unique(..., return_index=True)`` per image).
    * ``recall = tp / npos`` (npos: non-difficult ground truths), ``precision = tp / max(tp + fp, eps)``.
    * ``use_07_metric``: VOC2007 11-point AP, ``mean over t in np.arange(0, 1.1, 0.1)`` of ``max(precision[recall >=
      t])`` (0 when empty), with the devkit's exact ``arange`` points (0.30000000000000004 etc.); otherwise VOC2010+
      all-point AP, the area under the monotone (right-to-left running max) precision envelope.
    * deviation: the devkit computes IoU on inclusive pixel boxes (``w = x1 - x0 + 1``); ours are half-open, so no
      ``+1`` anywhere. ``"ignore"`` and ``"iscrowd"`` flags are treated as ``"difficult"`` here.

COCO (:func:`evaluate_coco`): ``pycocotools.cocoeval.COCOeval`` (``iouType="bbox"``, ``useCats=1``), exactly:
    * per image and class the detections are sorted stably by decreasing score and cut to the ``max_dets`` best
      (``max_dets`` applies per image *and class*, as in COCOeval).
    * a ground truth is ignored if flagged ``"ignore"``/``"difficult"``, if ``"iscrowd"``, or if its d-volume lies
      outside the area range (inclusive bounds, as COCOeval). A crowd ground truth's overlap is the intersection over
      the DETECTION's volume, and it may absorb any number of detections; a non-crowd ignored one absorbs one.
    * greedy matching in score order, at each IoU threshold ``t`` (used as ``min(t, 1 - 1e-10)``): a detection takes
      the still unmatched (or crowd) ground truth of the best IoU ``>= t``, non-ignored ground truths first, ties
      going to the LAST such ground truth in input order (COCOeval's ``<`` comparison). A detection matched to an
      ignored ground truth, or unmatched with its volume outside the area range, is ignored.
    * per class and area range, 101-point interpolated precision at ``recall_thresholds = linspace(0, 1, 101)``
      (``searchsorted(recall, r, side="left")`` into the right-to-left running max of
      ``precision = tp / (tp + fp + np.spacing(1))``; 0 beyond the last recall reached).
    * the defaults reproduce ``COCOeval.stats[0..2]`` (AP@[.5:.95], AP50, AP75 at maxDets=100) to the last bit: the
      default thresholds are COCOeval's ``np.linspace(0.5, 0.95, 10)``, not ``np.arange(0.5, 0.96, 0.05)``, whose
      points differ in the last bit and decide ties differently. Area ranges are d-volumes; ``"coco"`` gives
      ``all / small / medium / large`` split at ``32**d`` and ``96**d`` (COCO's 32^2 / 96^2 for d = 2). The upper
      bound of ``"all"`` is ``inf`` (COCOeval: 1e10).

Vectorisation
    VOC: no sequential loop at all (see above). COCO: greedy matching is sequential within an image-class pair, so
    the loop runs over the detection RANK r (at most ``max_dets`` steps): step r processes the r-th detection of
    every image-class pair at once, vectorised over pairs, IoU thresholds and area ranges (detections of one rank
    never compete for the same ground truth). Per-image loops compute the IoU matrices; per-class loops compute the
    curves from the matches. No loop visits individual detections.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..boxes import box_iou

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "COCO_RECALL_THRESHOLDS",
    "evaluate_voc",
    "evaluate_coco",
    "evaluate_detections",
    "DetectionEvaluator",
]

#: COCOeval's IoU thresholds, built exactly as pycocotools builds them.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCOeval's recall thresholds ``0, 0.01, .., 1``.
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
# VOC2007 11-point interpolation: the devkit's points, rounding quirks included.
_VOC07_POINTS = np.arange(0.0, 1.1, 0.1)


# ----------------------------------------------------------------------------------------------- input handling


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:  # pragma: no cover - message path
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from e


def _boxes(x, name: str) -> np.ndarray:
    b = _np(x, name)
    if b.size == 0 and b.ndim == 1:
        b = b.reshape(0, 0)  # an empty [0] array: d is taken from the other images
    if b.ndim != 2 or (b.shape[1] == 0 and b.shape[0]) or b.shape[1] % 2:
        raise ValueError(f"{name} must have shape [N, 2d] (lo_1..lo_d, hi_1..hi_d), got {tuple(b.shape)}")
    b = b.astype(np.float64)
    if not np.isfinite(b).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    d = b.shape[1] // 2
    if (b[:, d:] < b[:, :d]).any():
        raise ValueError(f"{name} has boxes with hi < lo; boxes are (lo_1..lo_d, hi_1..hi_d)")
    return b


def _vector(x, n: int, name: str, kind: str) -> np.ndarray:
    v = _np(x, name)
    v = v.reshape(-1) if v.size == 0 else v
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one entry per box), got {tuple(v.shape)}")
    if kind == "label":
        if v.dtype.kind == "f":
            if not (np.isfinite(v).all() and (v == np.round(v)).all()):
                raise ValueError(f"{name} must hold integer class ids")
        elif v.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integer class ids, got dtype {v.dtype}")
        return v.astype(np.int64)
    if kind == "flag":
        return v.astype(bool)
    v = v.astype(np.float64)
    if np.isnan(v).any():
        raise ValueError(f"{name} contains NaN scores")
    return v


@dataclass
class _Data:
    """All images, as float64 / int64 / bool numpy arrays (one list entry per image)."""

    d: int
    dt_boxes: list
    dt_scores: list
    dt_labels: list
    gt_boxes: list
    gt_labels: list
    gt_difficult: list  # "difficult" | "ignore"
    gt_crowd: list


def _get(item: Mapping, key: str, where: str):
    if not isinstance(item, Mapping):
        raise TypeError(f"{where} must be a dict with 'boxes', 'labels'..., got {type(item).__name__}")
    if key not in item:
        raise KeyError(f"{where} has no {key!r} entry")
    return item[key]


def _prepare(preds: Sequence[Mapping], gts: Sequence[Mapping]) -> _Data:
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts must list the same images, got {len(preds)} predictions and {len(gts)} targets")
    out = _Data(0, [], [], [], [], [], [], [])
    ds = set()
    for i, (p, g) in enumerate(zip(preds, gts)):
        db = _boxes(_get(p, "boxes", f"preds[{i}]"), f"preds[{i}]['boxes']")
        gb = _boxes(_get(g, "boxes", f"gts[{i}]"), f"gts[{i}]['boxes']")
        nd, ng = len(db), len(gb)
        ds.update(b.shape[1] // 2 for b in (db, gb) if b.shape[1])
        out.dt_boxes.append(db)
        out.gt_boxes.append(gb)
        out.dt_scores.append(_vector(_get(p, "scores", f"preds[{i}]"), nd, f"preds[{i}]['scores']", "score"))
        out.dt_labels.append(_vector(p.get("labels", np.zeros(nd, np.int64)), nd, f"preds[{i}]['labels']", "label"))
        out.gt_labels.append(_vector(g.get("labels", np.zeros(ng, np.int64)), ng, f"gts[{i}]['labels']", "label"))
        flags = {k: _vector(g[k], ng, f"gts[{i}][{k!r}]", "flag") if k in g else np.zeros(ng, bool)
                 for k in ("difficult", "ignore", "iscrowd")}
        out.gt_difficult.append(flags["difficult"] | flags["ignore"])
        out.gt_crowd.append(flags["iscrowd"])
    if len(ds) > 1:
        raise ValueError(f"all boxes must have the same number of spatial dims d, got d in {sorted(ds)}")
    out.d = ds.pop() if ds else 2
    for lst in (out.dt_boxes, out.gt_boxes):
        for j, b in enumerate(lst):
            if b.shape[1] == 0:
                lst[j] = np.zeros((0, 2 * out.d))
    return out


def _resolve_classes(data: _Data, num_classes: int | None, class_names) -> tuple[np.ndarray, list[str]]:
    labels = np.concatenate([np.zeros(0, np.int64)] + data.gt_labels + data.dt_labels)
    if class_names is not None:
        names = [str(n) for n in class_names]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} disagrees with {len(names)} class_names")
        num_classes = len(names)
    if num_classes is not None:
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
        classes = np.arange(int(num_classes))
        names = names if class_names is not None else [str(c) for c in classes]
        return classes, names
    classes = np.unique(labels)
    return classes, [str(c) for c in classes]


def _class_index(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Map labels to positions in the sorted ``classes`` (every label is present there)."""
    return np.searchsorted(classes, labels).astype(np.int64)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, 2d] x [M, 2d] -> [N, M]`` intersection d-volumes."""
    d = a.shape[1] // 2
    ext = np.minimum(a[:, None, d:], b[None, :, d:]) - np.maximum(a[:, None, :d], b[None, :, :d])
    return np.clip(ext, 0.0, None).prod(axis=-1)


def _overlaps(db: np.ndarray, gb: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU ``[D, G]``; for crowd ground truths (COCO) the intersection over the detection's volume instead."""
    iou = box_iou(torch.from_numpy(db), torch.from_numpy(gb)).numpy()
    if crowd is not None and crowd.any():
        inter = _intersection(db, gb[crowd])
        vol = np.prod(db[:, db.shape[1] // 2:] - db[:, : db.shape[1] // 2], axis=-1)[:, None]
        iou[:, crowd] = np.where(vol > 0, inter / np.where(vol > 0, vol, 1.0), 0.0)
    return iou


def _nanmean(x: np.ndarray) -> float:
    v = x[~np.isnan(x)]
    return float(v.mean()) if v.size else float("nan")


# ----------------------------------------------------------------------------------------------- VOC


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP of one class from its (devkit) recall / precision arrays in score order."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        if recall.size == 0:
            return 0.0
        # max(precision[recall >= t]) = running max from the right, read at the first index with recall >= t.
        env = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, _VOC07_POINTS, side="left")
        p = np.where(idx < recall.size, env[np.minimum(idx, recall.size - 1)], 0.0)
        return float(np.cumsum(p / 11.0)[-1])  # the devkit's sequential sum
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate_voc(
    preds: Sequence[Mapping],
    gts: Sequence[Mapping],
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    iou_inclusive: bool = False,
) -> dict[str, Any]:
    """PASCAL VOC AP per class and mAP (semantics: module docstring).

    Returns a dict with ``"map"`` (mean AP over classes that have non-difficult ground truth), ``"ap"`` ``[K]``
    (``nan`` for classes without ground truth), ``"per_class"`` ``{name: AP}``, ``"precision"`` / ``"recall"`` /
    ``"scores"`` (lists over classes of the devkit's per-detection curves in score order), counts ``"num_gt"``
    (non-difficult), ``"num_difficult"``, ``"num_det"``, ``"num_tp"``, ``"num_fp"`` ``[K]``, and ``"classes"``,
    ``"class_names"``, ``"iou_threshold"``, ``"use_07_metric"``, ``"metric": "voc"``.
    """
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    thr = float(iou_threshold)
    data = _prepare(preds, gts)
    classes, names = _resolve_classes(data, num_classes, class_names)
    K = len(classes)

    tps, fps, scores, cls = [], [], [], []
    for db, ds, dl, gb, gl, gdiff, gcrowd in zip(data.dt_boxes, data.dt_scores, data.dt_labels, data.gt_boxes,
                                                 data.gt_labels, data.gt_difficult, data.gt_crowd):
        order = np.argsort(-ds, kind="stable")
        db, ds, dl = db[order], ds[order], dl[order]
        n = len(db)
        if n and len(gb):
            ov = _overlaps(db, gb)
            ov[dl[:, None] != gl[None, :]] = -np.inf  # only ground truth of the detection's class competes
            jmax = np.argmax(ov, axis=1)
            ovmax = ov[np.arange(n), jmax]
        else:
            jmax, ovmax = np.zeros(n, np.int64), np.full(n, -np.inf)
        hit = ovmax >= thr if iou_inclusive else ovmax > thr
        skip = hit & (gdiff | gcrowd)[jmax] if len(gb) else np.zeros(n, bool)
        cand = np.nonzero(hit & ~skip)[0]
        tp = np.zeros(n, bool)
        # The first detection (in score order) whose candidate is a given ground truth is its TP, later ones are
        # duplicates; candidates are per image and class-specific, so the key is the ground truth index alone.
        tp[cand[np.unique(jmax[cand], return_index=True)[1]]] = True
        tps.append(tp)
        fps.append(~tp & ~skip)
        scores.append(ds)
        cls.append(_class_index(dl, classes))

    tp, fp = np.concatenate([np.zeros(0, bool)] + tps), np.concatenate([np.zeros(0, bool)] + fps)
    sc, ci = np.concatenate([np.zeros(0)] + scores), np.concatenate([np.zeros(0, np.int64)] + cls)
    order = np.lexsort((-sc, ci))  # stable: by class, then decreasing score, ties in image / input order
    tp, fp, sc, ci = tp[order], fp[order], sc[order], ci[order]
    bounds = np.searchsorted(ci, np.arange(K + 1))

    gl_all = np.concatenate([np.zeros(0, np.int64)] + [_class_index(g, classes) for g in data.gt_labels])
    gskip = np.concatenate([np.zeros(0, bool)] + [a | b for a, b in zip(data.gt_difficult, data.gt_crowd)])
    npos = np.bincount(gl_all[~gskip], minlength=K)
    ndiff = np.bincount(gl_all[gskip], minlength=K)

    ap = np.full(K, np.nan)
    precs, recs, scs = [], [], []
    for k in range(K):  # per class: cumulative sums and the AP integral, vectorised over detections
        s = slice(bounds[k], bounds[k + 1])
        ctp = np.cumsum(tp[s], dtype=np.float64)
        cfp = np.cumsum(fp[s], dtype=np.float64)
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        rec = ctp / npos[k] if npos[k] else np.full(ctp.shape, np.nan)
        if npos[k]:
            ap[k] = voc_ap(rec, prec, use_07_metric)
        precs.append(prec)
        recs.append(rec)
        scs.append(sc[s])
    num_det = np.diff(bounds)
    num_tp = np.bincount(ci[tp], minlength=K)
    num_fp = np.bincount(ci[fp], minlength=K)
    return {
        "metric": "voc",
        "map": _nanmean(ap),
        "ap": ap,
        "per_class": dict(zip(names, ap.tolist())),
        "precision": precs,
        "recall": recs,
        "scores": scs,
        "num_gt": npos,
        "num_difficult": ndiff,
        "num_det": num_det,
        "num_tp": num_tp,
        "num_fp": num_fp,
        "classes": classes,
        "class_names": names,
        "iou_threshold": thr,
        "use_07_metric": bool(use_07_metric),
        "iou_inclusive": bool(iou_inclusive),
    }


# ----------------------------------------------------------------------------------------------- COCO


def _area_ranges(area_ranges, d: int) -> tuple[list[str], np.ndarray]:
    if area_ranges is None:
        return ["all"], np.array([[0.0, np.inf]])
    if isinstance(area_ranges, str):
        if area_ranges != "coco":
            raise ValueError(f"area_ranges must be None, 'coco' or a dict name -> (lo, hi), got {area_ranges!r}")
        s, m = 32.0 ** d, 96.0 ** d
        return ["all", "small", "medium", "large"], np.array([[0.0, np.inf], [0.0, s], [s, m], [m, np.inf]])
    names = [str(k) for k in area_ranges]
    rng = np.array([[float(v[0]), float(v[1])] for v in area_ranges.values()], dtype=np.float64).reshape(-1, 2)
    if not names or (rng[:, 0] > rng[:, 1]).any():
        raise ValueError(f"area_ranges must map names to (lo, hi) with lo <= hi, got {dict(area_ranges)}")
    return names, rng


def evaluate_coco(
    preds: Sequence[Mapping],
    gts: Sequence[Mapping],
    iou_thresholds: Sequence[float] | np.ndarray | None = None,
    max_dets: int = 100,
    area_ranges: str | Mapping[str, tuple[float, float]] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """COCO-style AP (semantics of pycocotools ``COCOeval``, for boxes of any d; see the module docstring).

    ``iou_thresholds`` defaults to COCOeval's ``linspace(0.5, 0.95, 10)``. ``area_ranges``: ``None`` (only
    ``"all"``), ``"coco"`` (all / small / medium / large at ``32**d`` and ``96**d``), or ``{name: (lo, hi)}`` in
    d-volume units (the first entry is the primary range).

    Returns a dict with ``"map"`` (AP@thresholds, COCOeval ``stats[0]``), ``"map_50"``, ``"map_75"`` (``nan`` if the
    threshold is not evaluated), ``"map_<range>"`` for the other area ranges, ``"mar"`` (mean recall at ``max_dets``),
    per class ``"ap"``, ``"ap50"``, ``"ap75"`` ``[K]`` (``nan`` without ground truth) and ``"per_class"``,
    ``"precision"`` ``[T, R, K, A]`` and ``"recall"`` ``[T, K, A]`` (COCOeval's tables without the maxDets axis,
    ``nan`` where COCOeval has -1), ``"num_gt"`` (non-ignored, primary range) and ``"num_det"`` (after ``max_dets``)
    ``[K]``, and ``"iou_thresholds"``, ``"recall_thresholds"``, ``"area_ranges"``, ``"classes"``, ``"class_names"``.
    """
    thrs = COCO_IOU_THRESHOLDS.copy() if iou_thresholds is None else np.asarray(iou_thresholds, np.float64).reshape(-1)
    if thrs.size == 0 or (thrs < 0).any() or (thrs > 1).any():
        raise ValueError(f"iou_thresholds must be a non-empty list of values in [0, 1], got {thrs}")
    if int(max_dets) != max_dets or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets}")
    max_dets = int(max_dets)
    data = _prepare(preds, gts)
    classes, names = _resolve_classes(data, num_classes, class_names)
    area_names, rng = _area_ranges(area_ranges, data.d)
    K, T, A = len(classes), len(thrs), len(rng)
    R = len(COCO_RECALL_THRESHOLDS)
    thr_eff = np.minimum(thrs, 1 - 1e-10)

    # -- per image: rank detections, keep max_dets per class, collect same-class (det, gt) pairs that can match
    d_off = g_off = 0
    dets, pairs = [], []
    for db, ds, dl, gb, gl, gcrowd in zip(data.dt_boxes, data.dt_scores, data.dt_labels, data.gt_boxes,
                                          data.gt_labels, data.gt_crowd):
        order = np.argsort(-ds, kind="stable")
        by_cls = np.argsort(dl[order], kind="stable")  # groups per class, score order inside each group
        grouped = dl[order][by_cls]
        first = np.searchsorted(grouped, grouped, side="left")
        rank = np.empty(len(order), np.int64)
        rank[by_cls] = np.arange(len(order)) - first
        keep = rank < max_dets
        order, rank = order[keep], rank[keep]
        db, ds, dl = db[order], ds[order], dl[order]
        dets.append((db, ds, dl, rank))
        if len(db) and len(gb):
            ov = _overlaps(db, gb, gcrowd)
            di, gi = np.nonzero((dl[:, None] == gl[None, :]) & (ov >= thr_eff.min()))  # row-major: det, then gt
            pairs.append((di + d_off, gi + g_off, ov[di, gi], rank[di]))
        d_off += len(db)
        g_off += len(gb)
    D, G = d_off, g_off
    dt_boxes = np.concatenate([np.zeros((0, 2 * data.d))] + [x[0] for x in dets])
    dt_scores = np.concatenate([np.zeros(0)] + [x[1] for x in dets])
    dt_cls = _class_index(np.concatenate([np.zeros(0, np.int64)] + [x[2] for x in dets]), classes)
    gt_boxes = np.concatenate([np.zeros((0, 2 * data.d))] + data.gt_boxes)
    gt_cls = _class_index(np.concatenate([np.zeros(0, np.int64)] + data.gt_labels), classes)
    gt_crowd = np.concatenate([np.zeros(0, bool)] + data.gt_crowd)
    gt_flag = np.concatenate([np.zeros(0, bool)] + data.gt_difficult) | gt_crowd

    half = data.d
    gt_vol = np.prod(gt_boxes[:, half:] - gt_boxes[:, :half], axis=1)
    dt_vol = np.prod(dt_boxes[:, half:] - dt_boxes[:, :half], axis=1)
    gt_ign = gt_flag[None, :] | (gt_vol[None, :] < rng[:, :1]) | (gt_vol[None, :] > rng[:, 1:])  # [A, G]
    dt_out = (dt_vol[None, :] < rng[:, :1]) | (dt_vol[None, :] > rng[:, 1:])  # [A, D]

    # -- greedy matching, one step per detection rank, vectorised over image-class pairs x thresholds x ranges
    pd, pg, piou, prank = (np.concatenate([np.zeros(0, t)] + [p[j] for p in pairs])
                           for j, t in enumerate((np.int64, np.int64, np.float64, np.int64)))
    order = np.lexsort((pg, pd, prank))
    pd, pg, piou, prank = pd[order], pg[order], piou[order], prank[order]
    n_steps = int(prank.max()) + 1 if prank.size else 0
    steps = np.searchsorted(prank, np.arange(n_steps + 1))
    gt_taken = np.zeros((A, T, G), bool)
    det_gt = np.full((A, T, D), -1, np.int32 if G < 2**31 - 1 else np.int64)
    for r in range(n_steps):  # r-th ranked detection of every image-class pair at once
        s = slice(steps[r], steps[r + 1])
        if s.start == s.stop:
            continue
        sd, sg, siou = pd[s], pg[s], piou[s]
        seg_det, starts, seg = np.unique(sd, return_index=True, return_inverse=True)
        free = ~gt_taken[:, :, sg] | gt_crowd[sg]  # [A, T, P]
        ok = free & (siou[None, None, :] >= thr_eff[None, :, None])
        tier = ok * (1 + (~gt_ign[:, None, sg]).astype(np.int8))  # 2: regular gt, 1: ignored gt, 0: not allowed
        best_tier = np.maximum.reduceat(tier, starts, axis=2)
        cand = (tier == best_tier[..., seg]) & (tier > 0)
        ciou = np.where(cand, siou, -1.0)
        cand &= ciou == np.maximum.reduceat(ciou, starts, axis=2)[..., seg]
        last = np.maximum.reduceat(np.where(cand, np.arange(len(sd)), -1), starts, axis=2)  # ties: last gt wins
        a_i, t_i, s_i = np.nonzero(last >= 0)
        g = sg[last[a_i, t_i, s_i]]
        det_gt[a_i, t_i, seg_det[s_i]] = g
        gt_taken[a_i, t_i, g] = True

    matched = det_gt >= 0
    gt_ign_pad = np.concatenate([gt_ign, np.zeros((A, 1), bool)], axis=1)
    dt_ign = np.where(matched, gt_ign_pad[np.arange(A)[:, None, None], np.where(matched, det_gt, G)],
                      dt_out[:, None, :])
    tps = matched & ~dt_ign  # [A, T, D]
    fps = ~matched & ~dt_ign

    # -- accumulate per class: all images' detections in one stable score order (image order on ties)
    order = np.lexsort((-dt_scores, dt_cls))
    tps, fps, dt_cls_s = tps[..., order], fps[..., order], dt_cls[order]
    bounds = np.searchsorted(dt_cls_s, np.arange(K + 1))
    npig = np.stack([np.bincount(gt_cls[~gt_ign[a]], minlength=K) for a in range(A)], axis=1)  # [K, A]
    precision = np.full((T, R, K, A), np.nan)
    recall = np.full((T, K, A), np.nan)
    for k in range(K):
        s = slice(bounds[k], bounds[k + 1])
        nd = s.stop - s.start
        tp = np.cumsum(tps[..., s], axis=-1, dtype=np.float64)  # [A, T, nd]
        fp = np.cumsum(fps[..., s], axis=-1, dtype=np.float64)
        for a in range(A):
            if npig[k, a] == 0:
                continue  # no ground truth: COCOeval's -1, left out of the means
            rc = tp[a] / npig[k, a]
            pr = tp[a] / (fp[a] + tp[a] + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone envelope, right to left
            recall[:, k, a] = rc[:, -1] if nd else 0.0
            for t in range(T):  # searchsorted is 1-D; T is small
                idx = np.searchsorted(rc[t], COCO_RECALL_THRESHOLDS, side="left")
                precision[t, :, k, a] = np.where(idx < nd, pr[t, np.minimum(idx, max(nd - 1, 0))] if nd else 0.0, 0.0)

    def at(x: float) -> np.ndarray:
        return np.nonzero(np.isclose(thrs, x, rtol=0.0, atol=1e-9))[0]

    ap = np.array([_nanmean(precision[:, :, k, 0]) for k in range(K)])
    ap50 = np.array([_nanmean(precision[at(0.5), :, k, 0]) for k in range(K)])
    ap75 = np.array([_nanmean(precision[at(0.75), :, k, 0]) for k in range(K)])
    out = {
        "metric": "coco",
        "map": _nanmean(precision[..., 0]),
        "map_50": _nanmean(precision[at(0.5)][..., 0]),
        "map_75": _nanmean(precision[at(0.75)][..., 0]),
    }
    for a in range(1, A):
        out[f"map_{area_names[a]}"] = _nanmean(precision[..., a])
    out.update({
        "mar": _nanmean(recall[..., 0]),
        "ap": ap,
        "ap50": ap50,
        "ap75": ap75,
        "per_class": dict(zip(names, ap.tolist())),
        "precision": precision,
        "recall": recall,
        "num_gt": npig[:, 0],
        "num_det": np.diff(bounds),
        "iou_thresholds": thrs,
        "recall_thresholds": COCO_RECALL_THRESHOLDS.copy(),
        "area_ranges": {n: (float(lo), float(hi)) for n, (lo, hi) in zip(area_names, rng)},
        "max_dets": max_dets,
        "classes": classes,
        "class_names": names,
    })
    return out


# ----------------------------------------------------------------------------------------------- summary


def evaluate_detections(preds: Sequence[Mapping], gts: Sequence[Mapping], class_names: Sequence[str]) -> dict[str, Any]:
    """The one summary of a detector on a labelled set, with one set of keys used everywhere (``evaluate``, validation
    during training, reports):

    ``{"images": int, "boxes": int (ground-truth boxes), "map50": VOC all-point mAP@0.5, "map50_07": VOC2007
    11-point mAP@0.5, "coco_map": COCO mAP@[.5:.95], "ap50_per_class": {name: VOC all-point AP@0.5}}``.

    Built on :func:`evaluate_voc` and :func:`evaluate_coco` (inputs as described there). A class without ground truth
    has AP ``nan`` and is left out of the means; a mean over no class is ``nan``.
    """
    names = [str(n) for n in class_names]
    voc = evaluate_voc(preds, gts, class_names=names)
    voc07 = evaluate_voc(preds, gts, class_names=names, use_07_metric=True)
    coco = evaluate_coco(preds, gts, class_names=names)
    return {
        "images": len(gts),
        "boxes": int(sum(len(g["boxes"]) for g in gts)),
        "map50": float(voc["map"]),
        "map50_07": float(voc07["map"]),
        "coco_map": float(coco["map"]),
        "ap50_per_class": {k: float(v) for k, v in voc["per_class"].items()},
    }


# ----------------------------------------------------------------------------------------------- accumulator


class DetectionEvaluator:
    """Collects predictions and targets batch by batch; :meth:`compute` runs :func:`evaluate_coco` or
    :func:`evaluate_voc` on everything seen since the last :meth:`reset`.

    ``metric``: ``"coco"`` or ``"voc"``; further keyword arguments go to that function (``iou_thresholds``,
    ``max_dets``, ``area_ranges`` / ``iou_threshold``, ``use_07_metric``, ...). :meth:`update` copies the tensors to
    host numpy arrays at once, so no GPU memory or autograd graph is held between batches.
    """

    def __init__(self, metric: str = "coco", num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, **kwargs: Any):
        if metric not in ("coco", "voc"):
            raise ValueError(f"metric must be 'coco' or 'voc', got {metric!r}")
        fn = evaluate_coco if metric == "coco" else evaluate_voc
        unknown = set(kwargs) - set(inspect.signature(fn).parameters) | ({"preds", "gts"} & set(kwargs))
        if unknown:
            raise TypeError(f"unexpected keyword arguments for evaluate_{metric}: {sorted(unknown)}")
        self.metric = metric
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.kwargs = kwargs
        self.predictions: list[dict[str, np.ndarray]] = []
        self.targets: list[dict[str, np.ndarray]] = []

    def reset(self) -> None:
        self.predictions.clear()
        self.targets.clear()

    def __len__(self) -> int:
        return len(self.predictions)

    @staticmethod
    def _host(item: Mapping, where: str) -> dict[str, np.ndarray]:
        if not isinstance(item, Mapping):
            raise TypeError(f"{where} must be a dict with 'boxes', 'labels'..., got {type(item).__name__}")
        return {k: _np(v, f"{where}[{k!r}]").copy() for k, v in item.items()
                if k in ("boxes", "scores", "labels", "difficult", "ignore", "iscrowd")}

    def update(self, preds: Sequence[Mapping], targets: Sequence[Mapping]) -> None:
        """Add one batch: ``preds`` and ``targets`` are lists over the batch's images (see the module docstring)."""
        if len(preds) != len(targets):
            raise ValueError(f"update() needs one target per prediction, got {len(preds)} and {len(targets)}")
        base = len(self.predictions)
        self.predictions.extend(self._host(p, f"preds[{base + i}]") for i, p in enumerate(preds))
        self.targets.extend(self._host(t, f"targets[{base + i}]") for i, t in enumerate(targets))

    def compute(self) -> dict[str, Any]:
        fn = evaluate_coco if self.metric == "coco" else evaluate_voc
        return fn(self.predictions, self.targets, num_classes=self.num_classes, class_names=self.class_names,
                  **self.kwargs)
