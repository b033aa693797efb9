"""What a run folder shows a person: ``curves.png`` (losses and validation metrics), ``best.json`` (the best
validation epoch and its weights), read back by ``medetect export --best``.

Files of a run folder written by :class:`~medetect.engine.Trainer`:

================== ===========================================================================================
``metrics.csv``    one row per epoch: ``epoch, step, train_loss, images_per_s`` and, on validation epochs, the
                   ``val_*`` metrics
``steps.csv``      one row every ``train.log_every`` steps and at each epoch's last step: ``epoch, step, loss,
                   lr, images_per_s`` and each loss
``curves.png``     per-step and per-epoch loss, and the validation metrics, redrawn after every epoch
``best.json``      ``{"metric", "value", "epoch", "step", "weights"}``: the best validation epoch so far
``best.safetensors`` that epoch's model weights (kept apart from the rolling checkpoints)
================== ===========================================================================================
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Sequence

__all__ = ["write_curves", "read_best", "BEST_JSON", "BEST_WEIGHTS"]

BEST_JSON = "best.json"
BEST_WEIGHTS = "best.safetensors"
# summary columns of a validation that are counts, not metrics (not plotted)
_NOT_PLOTTED = ("val_images", "val_boxes")


def _floats(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            y = float(r.get(key, ""))
        except (TypeError, ValueError):
            continue
        if math.isfinite(y):
            xs.append(float(r.get("step") or 0))
            ys.append(y)
    return xs, ys


def write_curves(run_dir: str | os.PathLike, history: Sequence[dict], path: str | os.PathLike | None = None) -> Path:
    """Draw ``curves.png`` of a run: left, the per-step loss (``steps.csv``) and the per-epoch ``train_loss``
    against the step; right, each validation metric (``val_*`` except counts and per-class APs) against the step.
    Written through a temporary file and renamed, so a reader never sees half a picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    out = Path(path) if path is not None else run_dir / "curves.png"
    steps: list[dict] = []
    if (run_dir / "steps.csv").is_file():
        with open(run_dir / "steps.csv", newline="") as f:
            steps = list(csv.DictReader(f))
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x, y = _floats(steps, "loss")
    if x:
        ax1.plot(x, y, lw=0.8, alpha=0.6, label="loss (steps)")
    x, y = _floats(history, "train_loss")
    if x:
        ax1.plot(x, y, "o-", label="train_loss (epoch mean)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    if ax1.lines:
        ax1.legend(fontsize=8)
    keys = sorted({k for r in history for k in r if k.startswith("val_") and k not in _NOT_PLOTTED
                   and not k.startswith("val_ap50_")})
    for k in keys:
        x, y = _floats(history, k)
        if x:
            ax2.plot(x, y, "o-", label=k)
    ax2.set_xlabel("step")
    ax2.set_title("validation")
    if ax2.lines:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out


def read_best(run_dir: str | os.PathLike) -> dict | None:
    """The run's ``best.json`` (with ``weights`` as an absolute path), or None when there is none (no validation
    yet). A damaged file is an error naming it."""
    p = Path(run_dir) / BEST_JSON
    if not p.is_file():
        return None
    try:
        best = json.loads(p.read_text())
        best["weights"] = str(Path(run_dir) / best["weights"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a best.json written by medetect train ({e})") from None
    return best
