"""Evaluation plots written as PNG (matplotlib's Agg canvas, no pyplot state): precision-recall curves of a detection
evaluation, and the LUNA16 FROC curve with its bootstrap band."""

from __future__ import annotations

import math
from pathlib import Path
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from .froc import FROCResult

__all__ = ["pr_curve_png", "plot_froc"]


def _curves(result: Mapping[str, Any], iou_threshold: float | None, area: str | None):
    """Per class ``(recall, precision, ap)`` for a VOC or COCO result, plus a description of what is drawn."""
    metric = result.get("metric")
    if metric == "voc":
        op = ">=" if result.get("iou_inclusive") else ">"
        desc = f"VOC, IoU {op} {result['iou_threshold']:g}" + (" (11-point AP)" if result.get("use_07_metric") else "")
        return [(r, p, a) for r, p, a in zip(result["recall"], result["precision"], result["ap"])], desc
    if metric == "coco":
        areas = list(result["area_ranges"])
        a = 0 if area is None else areas.index(area) if area in areas else None
        if a is None:
            raise ValueError(f"area must be one of {areas}, got {area!r}")
        prec = result["precision"][..., a]  # [T, R, K]
        if iou_threshold is None:
            t = np.arange(prec.shape[0])
            thr = result["iou_thresholds"]
            desc = f"COCO, IoU {thr[0]:.2f}:{thr[-1]:.2f} (mean precision)"
        else:
            t = np.nonzero(np.isclose(result["iou_thresholds"], iou_threshold, rtol=0.0, atol=1e-9))[0]
            if t.size == 0:
                raise ValueError(f"iou_threshold {iou_threshold} was not evaluated; have {result['iou_thresholds']}")
            desc = f"COCO, IoU {iou_threshold:.2f}"
        desc += f", area {areas[a]}"
        rec = result["recall_thresholds"]
        out = []
        for k in range(prec.shape[2]):
            p = prec[t, :, k]
            if np.isnan(p).all():
                out.append((rec, np.full(rec.shape, np.nan), float("nan")))
            else:
                curve = p.mean(axis=0)  # its 101-point mean is the AP shown
                out.append((rec, curve, float(curve.mean())))
        return out, desc
    raise ValueError(f"result must come from evaluate_voc or evaluate_coco (metric 'voc' / 'coco'), got {metric!r}")


def pr_curve_png(
    result: Mapping[str, Any],
    path: str | Path,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    iou_threshold: float | None = None,
    area: str | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw one precision-recall curve per class, its AP in the legend, and save a PNG at ``path``.

    ``result``: the dict of :func:`~medetect.evaluation.detection.evaluate_voc` (the devkit's per-detection curve)
    or :func:`~medetect.evaluation.detection.evaluate_coco` (the 101-point interpolated curve; averaged over the
    IoU thresholds unless ``iou_threshold`` picks one, for the area range ``area``, default the first). The legend's
    AP is the area of the curve drawn. ``class_names``: a list over the result's classes or a dict class id -> name
    (default: the result's names). Classes without ground truth are listed as such, without a curve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves, desc = _curves(result, iou_threshold, area)
    ids = [int(c) for c in result["classes"]]
    names = list(result["class_names"])
    if class_names is not None:
        if isinstance(class_names, Mapping):
            names = [str(class_names.get(c, n)) for c, n in zip(ids, names)]
        else:
            if len(class_names) != len(ids):
                raise ValueError(f"class_names has {len(class_names)} entries for {len(ids)} classes")
            names = [str(n) for n in class_names]

    fig = Figure(figsize=(6.4, 5.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (rec, prec, ap) in zip(names, curves):
        ap = float(ap)
        if math.isnan(ap) or len(rec) == 0:  # no ground truth, or (VOC) no detection: nothing to draw
            ax.plot([], [], linestyle="none", label=f"{name} (no ground truth)" if math.isnan(ap) else f"{name} (AP={ap:.3f})")
            continue
        ax.plot(np.asarray(rec), np.asarray(prec), drawstyle="steps-post" if result["metric"] == "coco" else "default",
                linewidth=1.5, label=f"{name} (AP={ap:.3f})")
    if not curves:
        ax.text(0.5, 0.5, "no classes", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    aps = np.array([c[2] for c in curves], dtype=np.float64)
    mean = float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")
    ax.set_title(title if title is not None else f"{desc}; mAP={mean:.3f}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="best", fontsize=8 if len(curves) <= 10 else 6, ncol=1 if len(curves) <= 12 else 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_froc(result: FROCResult, path: str | os.PathLike, *, title: str | None = None, dpi: int = 150) -> None:
    """Write the FROC curve (log2 x axis from 1/8 to 8 FPs/scan) with the bootstrap band as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    from .froc import CURVE_GRID_POINTS, FROC_MAX_X, FROC_MIN_X, OPERATING_POINTS  # lazy: froc imports this module

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.linspace(FROC_MIN_X, FROC_MAX_X, num=CURVE_GRID_POINTS)
    y = np.interp(x, result.curve_fps, result.curve_sensitivities)
    colour = "tab:blue"
    if result.bootstrap_fps is not None:
        pct = f"{100 * result.confidence:g}%"
        ax.fill_between(result.bootstrap_fps, result.bootstrap_low, result.bootstrap_high,
                        color=colour, alpha=0.2, linewidth=0,
                        label=f"{pct} bootstrap interval ({result.n_bootstrap_valid} resamples)")
        ax.plot(result.bootstrap_fps, result.bootstrap_mean, color=colour, ls="--", lw=1,
                label="bootstrap mean")
    ax.plot(x, y, color=colour, lw=2, label=f"FROC (CPM = {result.cpm:.3f})")
    ax.plot(result.fps, result.sensitivities, "o", color=colour, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlim(FROC_MIN_X, FROC_MAX_X)
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(FixedLocator(list(OPERATING_POINTS)))
    ax.xaxis.set_major_formatter(FixedFormatter(["0.125", "0.25", "0.5", "1", "2", "4", "8"]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yticks(np.linspace(0.0, 1.0, 11))
    ax.grid(True, which="major", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(title or f"FROC: {result.n_scans} scans, {result.n_nodules} nodules")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
