"""``medetect plan``: read a dataset once and write a whole training config for it (the nnDetection idea, small).

Input: a config whose ``data:`` section names the dataset (any :mod:`medetect.data.formats` format; the other
sections may be absent). Output: a ``task: detection`` YAML that ``medetect train`` runs as is, with these choices,
each one a rule stated here and repeated as a comment in the file:

* **dimension and architecture**: 2D -> Faster R-CNN (ResNet-18-FPN, the shipped BCCD recipe), 3D -> RetinaNet (the
  LUNA16 stage-one recipe); the positive anchor IoU is then 0.7 (RPN) or 0.5 (RetinaNet).
* **spacing**: the median spacing per axis is reported; with anisotropy (largest / smallest median > 3) the target
  for the coarse axis is its 10th percentile (nnU-Net's rule). The ``detection`` task trains on the stored grid
  (2D: ``data.scale``), so the spacing is reported, not resampled.
* **scale (2D)**: the median longer image side is brought to at most 512 px, but the 5th percentile of the shorter
  box side is kept at >= 6 px.
* **intensity**: a 3D volume with negative values is CT: the foreground (inside-box) 0.5..99.5 percentiles ``lo, hi``
  map to -1..1 (``max_value 1, mean (lo + hi) / 2, std (hi - lo) / 2``); otherwise values are divided by the dtype's
  maximum (255, 65535) and normalised with the per-channel mean and std.
* **anchors**: chosen greedily from candidate shapes (2D: square-root areas x the aspect ratios the boxes need;
  3D: the box shapes themselves) to maximise the **coverage**, the fraction of training boxes whose best anchor has a
  shape IoU (anchor and box centred on each other, i.e. ignoring the stride offset) >= the positive threshold;
  sizes go to pyramid level ``round(log2(size / 4))`` (stride 4 for 16 px anchors, the BCCD config's layout).
* **batch size** from ``--memory-gb``: a heuristic activation budget of ``K`` bytes per input voxel (K = 4 B x 600
  for the 2D recipe, 4 B x 1500 for the 3D one) within half the memory, clamped to 1..16. It is a rule of thumb,
  not a measurement.
* **augmentation**: colour 2D (microscopy) flips both ways and rotates by 90 degrees; greyscale 2D (radiographs:
  left and right differ) only zooms 0.9..1.1 with intensity jitter; 3D flips in-plane.

``--report DIR`` writes ``DIR/index.html``: counts, image sizes and spacings, boxes per image, box-size histograms
per class and the anchor IoU distribution with the coverage (:mod:`medetect.apps.plan_report`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from ..config import load_config
from ..data.formats import open_dataset

__all__ = ["plan_dataset", "shape_iou", "anchor_coverage", "choose_anchors_2d", "choose_shapes_3d"]

_BYTES_PER_VOXEL = {2: 4 * 600, 3: 4 * 1500}


def shape_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of box shapes ``[N, d]`` and anchor shapes ``[A, d]`` centred on each other -> ``[N, A]``."""
    inter = np.prod(np.minimum(boxes[:, None, :], anchors[None, :, :]), axis=-1)
    union = np.prod(boxes, -1)[:, None] + np.prod(anchors, -1)[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def anchor_coverage(boxes: np.ndarray, anchors: np.ndarray, threshold: float) -> tuple[float, np.ndarray]:
    """(fraction of boxes whose best anchor has shape IoU >= ``threshold``, best IoU per box ``[N]``)."""
    best = shape_iou(boxes, anchors).max(1) if len(anchors) else np.zeros(len(boxes))
    return float((best >= threshold).mean()) if len(boxes) else 1.0, best


def _shapes_2d(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """Anchor (h, w) for sizes x ratios (h / w = ratio, area = size^2), as the anchor generator makes them."""
    return np.array([[s * math.sqrt(r), s / math.sqrt(r)] for s in sizes for r in ratios], dtype=np.float64)


def _greedy(boxes: np.ndarray, candidates: np.ndarray, shapes_of, threshold: float, max_items: int,
            target: float = 0.995) -> list[int]:
    """Indices of ``candidates`` picked one at a time, each adding the most covered boxes (ties: higher mean IoU)."""
    chosen: list[int] = []
    covered = np.zeros(len(boxes), bool)
    best_iou = np.zeros(len(boxes))
    per = [shape_iou(boxes, shapes_of(c)).max(1) for c in candidates]  # [C][N]
    while len(chosen) < max_items:
        gains = [((~covered & (p >= threshold)).sum(), np.maximum(best_iou, p).mean()) if i not in chosen else (-1, 0)
                 for i, p in enumerate(per)]
        i = max(range(len(per)), key=lambda k: gains[k])
        if gains[i][0] <= 0 and chosen:
            break
        chosen.append(i)
        covered |= per[i] >= threshold
        best_iou = np.maximum(best_iou, per[i])
        if covered.mean() >= target:
            break
    return chosen


def choose_anchors_2d(sizes_hw: np.ndarray, threshold: float, max_sizes: int = 12, goal: float = 0.95):
    """Aspect ratios and per-level anchor sizes for 2D boxes ``[N, 2]`` (h, w): the first ratio set of
    ``[1]``, ``[0.5, 1, 2]``, ``[0.33, 0.5, 1, 2, 3]`` whose greedy sizes reach ``goal`` coverage (else the best).
    Returns ``(levels, anchor sizes per level, ratios, coverage, best IoU per box)``."""
    side = np.sqrt(sizes_hw.prod(1))
    lo, hi = np.quantile(side, [0.005, 0.995])
    cands = np.exp(np.linspace(math.log(max(lo / 1.5, 2.0)), math.log(hi * 1.5), 48))
    best_plan = None
    for ratios in ([1.0], [0.5, 1.0, 2.0], [0.33, 0.5, 1.0, 2.0, 3.0]):
        pick = _greedy(sizes_hw, cands, lambda s, r=ratios: _shapes_2d([s], r), threshold, max_sizes)
        sizes = sorted(round(float(cands[i]), 1) for i in pick)
        cov, _ = anchor_coverage(sizes_hw, _shapes_2d(sizes, ratios), threshold)
        if best_plan is None or cov > best_plan[0] + 1e-9:
            best_plan = (cov, sizes, ratios)
        if cov >= goal:
            break
    _, sizes, ratios = best_plan
    by_level: dict[int, list[float]] = {}
    for s in sizes:
        by_level.setdefault(int(np.clip(round(math.log2(s / 4)), 2, 5)), []).append(s)
    levels = list(range(min(by_level), max(by_level) + 1))
    k = max(len(v) for v in by_level.values())  # the head is shared: every level gets k sizes
    anchor_sizes = [sorted(by_level.get(lv, []) + _fill(k - len(by_level.get(lv, [])), 4 * 2 ** (lv - 0.5),
                                                        4 * 2 ** (lv + 0.5), by_level.get(lv, []))) for lv in levels]
    cov, best = anchor_coverage(sizes_hw, _shapes_2d([s for ss in anchor_sizes for s in ss], ratios), threshold)
    return levels, anchor_sizes, ratios, cov, best


def choose_shapes_3d(sizes: np.ndarray, threshold: float, max_shapes: int = 8, seed: int = 0):
    """Per-level anchor shapes (array order) for 3D boxes ``[N, 3]``. Returns ``(levels, shapes per level, coverage,
    best IoU per box)``."""
    rng = np.random.default_rng(seed)
    cands = sizes if len(sizes) <= 400 else sizes[rng.choice(len(sizes), 400, replace=False)]
    cands = np.unique(np.round(cands, 1), axis=0)
    pick = _greedy(sizes, cands, lambda s: s[None], threshold, max_shapes)
    shapes = sorted((cands[i].round(1).tolist() for i in pick), key=lambda s: float(np.prod(s)))
    by_level: dict[int, list] = {2: [], 3: []}
    for s in shapes:
        by_level[2 if float(np.prod(s)) ** (1 / 3) < 10 else 3].append(s)
    k = max(len(v) for v in by_level.values())  # the head is shared: every level gets k shapes (extra: cubes)
    ranges = {2: (4.0, 10.0), 3: (10.0, 24.0)}
    for lv in (2, 3):
        sides = _fill(k - len(by_level[lv]), *ranges[lv], [float(np.prod(s)) ** (1 / 3) for s in by_level[lv]])
        by_level[lv] = sorted(by_level[lv] + [[side] * 3 for side in sides], key=lambda s: float(np.prod(s)))
    levels = [2, 3]
    cov, best = anchor_coverage(sizes, np.array([s for lv in levels for s in by_level[lv]]), threshold)
    return levels, [by_level[lv] for lv in levels], cov, best


def _fill(n: int, lo: float, hi: float, have: Sequence[float]) -> list[float]:
    """``n`` sizes spread geometrically over ``[lo, hi]``, away from the sizes a level already ``have``s."""
    if n <= 0:
        return []
    grid = np.geomspace(lo, hi, 4 * n + 4)[1:-1]
    out: list[float] = []
    for _ in range(n):
        taken = list(have) + out
        far = [abs(math.log(g / t)) if taken else 1.0 for g in grid for t in (taken or [1.0])]
        dist = np.array(far).reshape(len(grid), -1).min(1)
        out.append(round(float(grid[int(np.argmax(dist))]), 1))
    return out


def _stats(ds) -> dict:
    """One pass over the training images: shapes, spacings, channels, dtypes, intensity samples, boxes."""
    rng = np.random.default_rng(0)
    shapes, spacings, channels, dtypes, fg, allv, per_image = [], [], [], set(), [], [], []
    boxes, labels = [], []
    for i in range(len(ds)):
        img = ds.image(i)
        rec = ds.records[i]
        a = np.asarray(img.array)
        shapes.append(img.spatial_shape)
        spacings.append(tuple(img.spacing))
        channels.append(a.shape[0])
        dtypes.add(str(a.dtype))
        flat = a.reshape(a.shape[0], -1)
        idx = rng.choice(flat.shape[1], min(2000, flat.shape[1]), replace=False)
        allv.append(flat[:, idx].astype(np.float64))
        d = rec.ndim
        for b in rec.boxes[:8]:  # foreground samples from up to 8 boxes per image
            sl = tuple(slice(int(math.floor(lo)), max(int(math.floor(lo)) + 1, int(math.ceil(hi))))
                       for lo, hi in zip(b[:d], b[d:]))
            v = a[(slice(None),) + sl].reshape(a.shape[0], -1).astype(np.float64)
            fg.append(v[:, rng.choice(v.shape[1], min(200, v.shape[1]), replace=False)])
        per_image.append(len(rec))
        boxes.append(rec.boxes)
        labels += rec.labels
    d = ds.records[0].ndim
    return {"shapes": np.array(shapes), "spacings": np.array(spacings), "channels": channels, "dtypes": sorted(dtypes),
            "values": np.concatenate(allv, 1), "fg": np.concatenate(fg, 1) if fg else np.zeros((channels[0], 0)),
            "per_image": np.array(per_image), "boxes": np.concatenate(boxes).reshape(-1, 2 * d), "labels": labels,
            "ndim": d}


def _target_spacing(spacings: np.ndarray) -> list[float]:
    med = np.median(spacings, 0)
    target = med.copy()
    if med.max() / med.min() > 3:  # anisotropic: the coarse axis takes its 10th percentile (nnU-Net)
        ax = int(np.argmax(med))
        target[ax] = np.percentile(spacings[:, ax], 10)
    return [round(float(v), 4) for v in target]


def plan_dataset(config: str | Path, out: str | Path, *, memory_gb: float = 8.0, report: str | Path | None = None,
                 sets: Sequence[str] = ()) -> dict:
    """Plan a training config for the dataset of ``config``'s data section (see the module docstring); writes
    ``out`` (YAML) and, with ``report``, the HTML fingerprint. Returns the summary (coverage, seconds, choices)."""
    t0 = time.perf_counter()
    if memory_gb <= 0:
        raise ValueError(f"--memory-gb must be > 0, got {memory_gb}")
    cfg = load_config(config, sets)
    data = getattr(cfg, "data", None)
    if data is None or not hasattr(data, "source"):
        raise ValueError(f"{config}: plan needs a config with a detection data section (task: detection)")
    ds = open_dataset(**data.source(), split=data.train_split)
    if len(ds) == 0:
        raise ValueError(f"{config}: the split {data.train_split!r} has no images")
    st = _stats(ds)
    d = st["ndim"]
    if len(st["boxes"]) == 0:
        raise ValueError(f"{config}: the split {data.train_split!r} has no boxes to plan anchors from")
    sizes = st["boxes"][:, d:] - st["boxes"][:, :d]  # [N, d] array order
    chans = sorted(set(st["channels"]))
    if len(chans) > 1 and not data.channels:
        raise ValueError(f"{config}: the images have {chans} channels; set data.channels (1 or 3) first")
    c = data.channels or chans[0]
    med_shape = np.median(st["shapes"], 0)
    raw = cfg.to_dict()
    dd = raw["data"]
    # ---- scale (2D) and normalisation
    scale = 1.0
    if d == 2:
        scale = min(1.0, 512.0 / float(med_shape.max()))
        p5 = float(np.percentile(sizes.min(1), 5))
        scale = min(1.0, max(scale, 6.0 / max(p5, 1e-6)))
        scale = round(scale, 3)
    vals, fg = st["values"], st["fg"]
    ct = d == 3 and float(vals.min()) < 0
    if ct:
        lo, hi = np.percentile(fg if fg.size else vals, [0.5, 99.5])
        norm = {"max_value": 1.0, "mean": [round(float(lo + hi) / 2, 2)], "std": [round(max(float(hi - lo) / 2, 1.0), 2)]}
    else:
        top = 255.0 if "uint8" in st["dtypes"] else 65535.0 if "uint16" in st["dtypes"] else float(vals.max()) or 1.0
        v = vals / top
        if c != v.shape[0]:
            v = v.mean(0, keepdims=True) if c == 1 else np.repeat(v[:1], c, 0)
        norm = {"max_value": top, "mean": [round(float(m), 4) for m in v.mean(1)],
                "std": [round(max(float(s), 1e-3), 4) for s in v.std(1)]}
    # ---- anchors
    planned = sizes * scale
    if d == 2:
        arch, thr = "faster_rcnn", 0.7
        levels, anchor_sizes, ratios, cov, best = choose_anchors_2d(planned, thr)
        model_anchor = {"anchor_sizes": anchor_sizes, "aspect_ratios": ratios, "anchor_shapes": None}
    else:
        arch, thr = "retinanet", 0.5
        levels, shapes, cov, best = choose_shapes_3d(planned, thr)
        model_anchor = {"anchor_shapes": shapes, "anchor_sizes": [[float(4 * 2 ** lv)] for lv in levels]}
    # ---- batch from memory
    voxels = float(np.prod(med_shape * (scale if d == 2 else 1.0)))
    batch = int(np.clip(memory_gb * 2 ** 30 * 0.5 // (voxels * _BYTES_PER_VOXEL[d]), 1, 16))
    # ---- augmentation by modality
    if d == 3:
        aug = {"hflip": True, "vflip": True, "rot90": False, "random_scale": [1.0, 1.0], "intensity": False}
    elif c == 3:
        aug = {"hflip": True, "vflip": True, "rot90": True, "random_scale": [0.85, 1.15], "intensity": True}
    else:
        aug = {"hflip": False, "vflip": False, "rot90": False, "random_scale": [0.9, 1.1], "intensity": True}
    classes = list(ds.classes)
    model = raw["model"]
    model.update({"arch": arch, "ndim": d, "in_channels": c, "num_classes": len(classes), "class_names": classes,
                  "backbone": "resnet18", "base_width": 32 if d == 2 else 8, "fpn_channels": 64 if d == 2 else 16,
                  "levels": levels, **model_anchor, "norm": "group"})
    if d == 2:
        model.update({"roi_hidden": 256, "roi_batch_size_per_image": 256, "rpn_pre_nms_top_n": [1000, 500],
                      "rpn_post_nms_top_n": [1000, 300]})
        maxn = int(np.percentile(st["per_image"], 99)) if len(st["per_image"]) else 100
        model["detections_per_img"] = int(min(1000, max(100, 2 * maxn)))
    else:
        model.update({"score_thresh": 0.02, "nms_thresh": 0.1, "detections_per_img": 20})
    dd.update({"scale": scale, **norm, **aug, "channels": data.channels, "classes": list(data.classes)})
    dd.pop("dataset", None) if dd.get("format") else None
    raw["train"].update({"batch_size": batch})
    raw.pop("task", None)
    seconds = time.perf_counter() - t0
    spacing_med = [round(float(v), 4) for v in np.median(st["spacings"], 0)]
    summary = {"images": len(ds), "boxes": int(len(sizes)), "ndim": d, "classes": classes,
               "median_shape": [int(v) for v in med_shape], "median_spacing": spacing_med,
               "target_spacing": _target_spacing(st["spacings"]), "scale": scale, "arch": arch,
               "positive_iou": thr, "anchor_coverage": round(cov, 4), "levels": levels, "batch_size": batch,
               "intensity": norm, "planning_seconds": round(seconds, 2)}
    header = (f"# Planned by `medetect plan {config}` in {seconds:.1f} s from {len(ds)} images / {len(sizes)} boxes "
              f"({d}D).\n# Anchor coverage {cov:.4f}: the fraction of training boxes whose best anchor has shape IoU "
              f">= {thr} (the {arch} positive threshold).\n# Median image shape {summary['median_shape']}, median "
              f"spacing {spacing_med} (target {summary['target_spacing']}); scale {scale}; batch {batch} for "
              f"{memory_gb:g} GB (heuristic).\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump({"task": "detection", **raw}, sort_keys=False, default_flow_style=None))
    load_config(out)  # the plan must load as it is
    if report is not None:
        from .plan_report import write_report

        summary["report"] = str(write_report(Path(report), st, planned, best, thr, summary))
    return summary
