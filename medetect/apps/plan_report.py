"""The HTML dataset fingerprint of ``medetect plan --report DIR``: counts, image sizes and spacings, boxes per image,
box-size histograms per class and the anchor IoU distribution with the coverage (PNG figures beside ``index.html``)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

__all__ = ["write_report"]


def _figure(path: Path, draw) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot(1, 1, 1))
    fig.tight_layout()
    fig.savefig(path)
    return path.name


def write_report(folder: Path, st: dict, sizes: np.ndarray, best_iou: np.ndarray, threshold: float,
                 summary: dict) -> Path:
    """Write ``folder/index.html`` (+ PNGs) for the statistics ``st`` of :func:`medetect.apps.plan._stats`, the
    planned box sizes ``[N, d]`` and each box's best anchor IoU."""
    folder.mkdir(parents=True, exist_ok=True)
    d = sizes.shape[1]
    labels = np.array(st["labels"])
    axes = ("z", "y", "x")[-d:]

    def box_sizes(ax):
        side = np.prod(sizes, 1) ** (1 / d)
        bins = np.geomspace(max(side.min(), 0.5), side.max() * 1.01 + 1e-9, 30)
        for c in sorted(set(labels.tolist())):
            ax.hist(side[labels == c], bins=bins, alpha=0.6, label=f"{c} ({int((labels == c).sum())})")
        ax.set_xscale("log")
        ax.set_xlabel("box size (geometric mean side, planned grid)")
        ax.set_ylabel("boxes")
        ax.legend(fontsize=7)

    def per_image(ax):
        ax.hist(st["per_image"], bins=min(40, max(5, int(st["per_image"].max()) + 1)))
        ax.set_xlabel("boxes per image")
        ax.set_ylabel("images")

    def coverage(ax):
        ax.hist(best_iou, bins=40, range=(0, 1))
        ax.axvline(threshold, color="r", ls="--", label=f"positive IoU {threshold}")
        ax.set_xlabel("best anchor shape IoU per box")
        ax.set_ylabel("boxes")
        ax.set_title(f"coverage {summary['anchor_coverage']:.4f}")
        ax.legend(fontsize=7)

    figs = [_figure(folder / "box_sizes.png", box_sizes), _figure(folder / "boxes_per_image.png", per_image),
            _figure(folder / "anchor_coverage.png", coverage)]
    shapes, spac = st["shapes"], st["spacings"]
    rows = [("images", summary["images"]), ("boxes", summary["boxes"]), ("dimension", f"{d}D"),
            ("classes", ", ".join(f"{c}: {int((labels == c).sum())}" for c in sorted(set(labels.tolist())))),
            ("channels / dtypes", f"{sorted(set(st['channels']))} / {st['dtypes']}"),
            ("image shape min / median / max", " / ".join(str([int(v) for v in f(shapes, 0)])
                                                          for f in (np.min, np.median, np.max))),
            ("spacing min / median / max (mm, " + ",".join(axes) + ")",
             " / ".join(str([round(float(v), 3) for v in f(spac, 0)]) for f in (np.min, np.median, np.max))),
            ("target spacing", summary["target_spacing"]), ("scale", summary["scale"]),
            ("intensity", summary["intensity"]), ("architecture / levels", f"{summary['arch']} / {summary['levels']}"),
            ("anchor coverage (IoU >= %g)" % threshold, summary["anchor_coverage"]),
            ("modality / flips (h, v, rot90)", f"{summary['modality'] or 'unknown'} / {summary['augmentation']['hflip']}, "
                                               f"{summary['augmentation']['vflip']}, {summary['augmentation']['rot90']}"),
            ("batch size", summary["batch_size"]),
            ("training step, measured", f"{summary['step_memory_gb']:.3f} GB peak on {summary['step_device']} for the "
                                        f"largest input {summary['step_input_shape']} with "
                                        f"{summary['step_boxes_per_image']} boxes per image ({summary['step_seconds']} s; "
                                        f"budget {summary['memory_budget_gb']:g} GB)"),
            *(("note", n) for n in summary["notes"]),
            ("planning time (s)", summary["planning_seconds"])]
    table = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    imgs = "\n".join(f'<img src="{f}" alt="{f}">' for f in figs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medetect plan</title><style>body{{font-family:"
            f"sans-serif;margin:2em}}th{{text-align:left;padding-right:1em}}img{{max-width:48%}}</style></head><body>"
            f"<h1>Dataset fingerprint</h1><table>{table}</table><h2>Figures</h2>{imgs}</body></html>\n")
    out = folder / "index.html"
    out.write_text(page)
    return out
