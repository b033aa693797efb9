"""Lineage step 3: how well region proposals cover the objects. Recall at IoU 0.5 and 0.7 against the number of
proposals per image for selective search (OpenCV's fast and quality strategies), sliding windows, uniformly random
boxes and the RPN of a Faster R-CNN model file, on one or more datasets: ``recall.json`` and ``recall.png`` (one
panel per dataset and IoU threshold).

The baselines have no ranking of their own: the sliding windows (sizes from 8 px to the image's short side in
steps of sqrt(2), aspect ratios 1/2, 1, 2, stride half a window) are taken round-robin over the window shapes, in a
random order within a shape (fixed seed), so that the top n has every size (a plain random n would be almost all
8-16 px windows, the most numerous); uniform boxes are random anyway. Selective search keeps OpenCV's rank order and the
RPN its objectness order.

An image where a method finds no region counts as covering none of its objects; the number of such images is in the
result (``images_without_proposals``) and a warning says so. A method that cannot run on a dataset (no RPN weights
for it) is left off that panel and recorded under ``skipped``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.transforms import normalize_intensity
from ..data.transforms import scale as scale_sample
from ..evaluation.proposals import proposal_recall
from ..files import write_atomically
from ..models.io import load_model
from ..proposals import sliding_windows, uniform_boxes
from .data import LineageSet, load_split
from .proposals import ProposalConfig, _key, proposals_for

__all__ = ["METHODS", "DEFAULT_COUNTS", "recall_study", "rpn_proposals", "method_proposals", "plot_recall"]

METHODS = ("selective search (fast)", "selective search (quality)", "sliding windows", "uniform", "RPN")
DEFAULT_COUNTS = (10, 20, 50, 100, 200, 300, 500, 1000, 1500, 2000)
_SS_MODE = {"selective search (fast)": "fast", "selective search (quality)": "quality"}


def _window_sizes(shape: Sequence[int]) -> list[float]:
    short = float(min(shape))
    n = max(1, int(math.floor(2 * math.log2(max(short, 8.0) / 8.0))) + 1)
    return [8.0 * 2 ** (i / 2) for i in range(n)]


def _round_robin(windows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An order of ``windows [N, 2d]`` that takes one window of each shape in turn (random within a shape), so that
    the top n of a grid dominated by its many small windows still has every size."""
    d = windows.shape[1] // 2
    _, shape_id = torch.unique((windows[:, d:] - windows[:, :d]).round(decimals=3), dim=0, return_inverse=True)
    perm = torch.randperm(len(windows), generator=g)  # [N] random order
    grouped = perm[torch.sort(shape_id[perm], stable=True).indices]  # [N] by shape, random within a shape
    sid = shape_id[grouped]
    start = torch.zeros(int(sid.max()) + 2 if len(sid) else 1, dtype=torch.long)
    start[1:].scatter_add_(0, sid, torch.ones_like(sid))
    rank = torch.arange(len(sid)) - start.cumsum(0)[sid]  # [N] position within its shape
    return grouped[torch.sort(rank * (int(sid.max()) + 1 if len(sid) else 1) + sid, stable=True).indices]


def rpn_proposals(weights: str | os.PathLike, data: LineageSet, max_count: int,
                  device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], list[float]]:
    """Proposals (objectness order, at most ``max_count``) of the RPN of the Faster R-CNN in ``weights`` for every
    image of ``data``, in ``data``'s pixels, and the seconds per image. The image is prepared as the model's stored
    :class:`~medetect.models.io.Preprocess` says (resized from ``data.scale`` to the model's ``scale``, its intensity
    rule, zero padding to a multiple of 32, as :class:`medetect.engine.predictor.Predictor`); the RPN runs in eval
    mode with its test-time ``pre_nms_top_n`` / ``post_nms_top_n`` raised to ``max_count``."""
    loaded = load_model(weights, device=device)
    model = loaded.model
    rpn = getattr(model, "rpn", None)
    if loaded.kind != "detector" or rpn is None:
        raise ValueError(f"{weights}: not a Faster R-CNN model file (no RPN); the recall study needs one for 'RPN'")
    pre = loaded.preprocess
    factor = pre.scale / data.scale
    saved = rpn.pre_nms_top_n, rpn.post_nms_top_n
    rpn.pre_nms_top_n = (saved[0][0], max(saved[0][1], int(max_count)))
    rpn.post_nms_top_n = (saved[1][0], int(max_count))
    out, seconds = [], []
    try:
        with torch.no_grad():
            for image in data.images:  # loop over images
                t0 = time.perf_counter()
                x = image
                if factor != 1.0:
                    x = scale_sample({"image": x.float()}, factor)["image"]
                if x.shape[0] == 1 and pre.channels > 1:
                    x = x.expand(pre.channels, *x.shape[1:])
                x = normalize_intensity(x, pre.max_value, pre.mean, pre.std, window=pre.window)
                shape = tuple(x.shape[1:])
                size = [max(32, math.ceil(s / 32) * 32) for s in shape]
                batch = x.new_zeros(1, x.shape[0], *size)
                batch[(0, slice(None), *[slice(0, s) for s in shape])] = x
                batch = batch.to(device)
                boxes = rpn(model.features(batch), shape)[0][0].float().cpu()
                out.append(boxes / factor)
                seconds.append(time.perf_counter() - t0)
    finally:
        rpn.pre_nms_top_n, rpn.post_nms_top_n = saved
    return out, seconds


def method_proposals(method: str, data: LineageSet, max_count: int, *, cache_dir: str | os.PathLike | None = None,
                     rpn_weights: str | os.PathLike | None = None, proposals: ProposalConfig | None = None,
                     seed: int = 0, device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], dict]:
    """Ranked proposals ``[N_i <= max_count, 4]`` of every image of ``data`` by ``method`` (one of :data:`METHODS`)
    and ``{"seconds_per_image", "cached_images"}`` (selective search reads images already in ``cache_dir/ss`` from
    there; their time is the read, so ``seconds_per_image`` counts only the images computed)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    info: dict = {"cached_images": 0}
    if method in _SS_MODE:
        base = proposals or ProposalConfig()
        cfg = ProposalConfig(**{**base.to_dict(), "mode": _SS_MODE[method], "max_proposals": int(max_count)})
        cache = Path(cache_dir) / "ss" if cache_dir is not None else None
        out, computed = [], []
        for i in range(len(data)):  # loop over images: each timed on its own
            one = data.subset([i])
            stem = Path(data.ids[i]).stem or "image0"
            hit = cache is not None and (cache / f"{stem}.{_key(cfg, data.images[i])}.npz").is_file()
            t0 = time.perf_counter()
            out.append(proposals_for(one, cfg, cache)[0])
            if hit:
                info["cached_images"] += 1
            else:
                computed.append(time.perf_counter() - t0)
        info["seconds_per_image"] = sum(computed) / len(computed) if computed else None
        info["proposal_config"] = cfg.to_dict()
        return out, info
    if method == "RPN":
        if rpn_weights is None:
            raise ValueError("method 'RPN' needs rpn_weights (a Faster R-CNN model file)")
        out, secs = rpn_proposals(rpn_weights, data, max_count, device)
        info["seconds_per_image"] = sum(secs) / max(1, len(secs))
        info["weights"] = str(rpn_weights)
        return out, info
    out, t0 = [], time.perf_counter()
    g = torch.Generator().manual_seed(int(seed))
    for i, image in enumerate(data.images):  # loop over images
        shape = tuple(image.shape[1:])
        if method == "uniform":
            out.append(uniform_boxes(shape, max_count, seed=seed * 100003 + i))
        else:
            w = sliding_windows(shape, _window_sizes(shape), aspect_ratios=(0.5, 1.0, 2.0), stride_fraction=0.5)
            out.append(w[_round_robin(w, g)[:max_count]])
    info["seconds_per_image"] = (time.perf_counter() - t0) / max(1, len(data))
    return out, info


def plot_recall(result: dict, path: str | os.PathLike) -> Path:
    """``recall.png``: one panel per dataset (rows) and IoU threshold (columns), recall vs proposals per image
    (log axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    thr = [f"{t:g}" for t in result["iou_thresholds"]]
    fig, axes = plt.subplots(len(names), len(thr), figsize=(5.2 * len(thr), 3.8 * len(names)), squeeze=False)
    for r, name in enumerate(names):  # loop over panels
        ds = result["datasets"][name]
        for c, t in enumerate(thr):
            ax = axes[r][c]
            for method, m in ds["methods"].items():
                ax.plot(m["mean_proposals"], m["recall"][t], marker="o", ms=3, label=method)
            ax.set_xscale("log")
            ax.set_ylim(0, 1.01)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{name} ({ds['num_gt']} objects, {ds['num_images']} images): IoU >= {t}", fontsize=9)
            ax.set_xlabel("proposals per image")
            ax.set_ylabel("recall")
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)

    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=110, format="png")

    write_atomically(path, write)
    plt.close(fig)
    return path


def recall_study(data_specs: Mapping[str, str | LineageSet], methods: Sequence[str] | None = METHODS,
                 counts: Sequence[int] | None = DEFAULT_COUNTS, rpn_weights: Mapping[str, str | os.PathLike] | None = None,
                 cache_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None, *,
                 scales: Mapping[str, float] | None = None, classes: Mapping[str, Sequence[str]] | None = None,
                 iou_thresholds: Sequence[float] = (0.5, 0.7), proposals: ProposalConfig | None = None,
                 seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Recall vs proposals per image for every dataset in ``data_specs`` (``{name: spec or LineageSet}``; a spec is
    loaded with :func:`load_split` at ``scales[name]``, default 0.5) and every method in ``methods``. ``rpn_weights``
    ``{name: model file}``: the datasets that get an "RPN" line. Writes ``recall.json`` and ``recall.png`` into
    ``out_dir`` when given. Returns ``{"counts", "iou_thresholds", "datasets": {name: {"spec", "scale",
    "num_images", "num_gt", "methods": {method: proposal_recall(...) + timing}, "skipped": {method: why}}},
    "summary": {name: {method: {"recall@0.5 at 2000": ...}}}}``."""
    methods = list(methods or METHODS)
    counts = counts or DEFAULT_COUNTS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown proposal method {bad[0]!r}; known: {list(METHODS)}")
    cnt = sorted({int(n) for n in counts})
    if not cnt or cnt[0] < 1:
        raise ValueError(f"counts must be positive integers, got {list(counts)}")
    rpn_weights, scales, classes = dict(rpn_weights or {}), dict(scales or {}), dict(classes or {})
    result: dict = {"counts": cnt, "iou_thresholds": [float(t) for t in iou_thresholds], "datasets": {},
                    "summary": {}}
    for name, spec in data_specs.items():  # loop over datasets
        data = spec if isinstance(spec, LineageSet) else load_split(spec, scale=scales.get(name, 0.5),
                                                                     classes=classes.get(name, ()))
        ds = {"spec": data.spec, "scale": data.scale, "num_images": len(data), "num_gt": data.num_objects,
              "methods": {}, "skipped": {}}
        for method in methods:  # loop over methods
            if method == "RPN" and name not in rpn_weights:
                ds["skipped"][method] = "no RPN weights for this dataset"
                continue
            t0 = time.perf_counter()
            props, info = method_proposals(method, data, cnt[-1], cache_dir=cache_dir, rpn_weights=rpn_weights.get(name),
                                           proposals=proposals, seed=seed, device=device)
            empty = sum(len(p) == 0 for p in props)
            if empty:
                warnings.warn(f"{name}: {method} found no region in {empty} of {len(data)} images (their objects "
                              "count as missed)", RuntimeWarning, stacklevel=2)
            rec = proposal_recall(props, data.boxes, cnt, iou_thresholds)
            rec.update(info, images_without_proposals=int(empty), wall_seconds=time.perf_counter() - t0)
            ds["methods"][method] = rec
            if progress:
                at = {t: round(v[-1], 4) for t, v in rec["recall"].items()}
                print(f"recall {name} / {method}: at {cnt[-1]} proposals {at}, mean proposals "
                      f"{rec['mean_proposals'][-1]:.0f}, {rec['wall_seconds']:.1f} s", flush=True)
        result["datasets"][name] = ds
        result["summary"][name] = {m: {f"recall@{t} at {cnt[-1]}": r["recall"][t][-1] for t in r["recall"]}
                                   | {"mean_proposals": r["mean_proposals"][-1],
                                      "seconds_per_image": r.get("seconds_per_image")}
                                   for m, r in ds["methods"].items()}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "recall.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        plot_recall(result, out / "recall.png")
    return result
