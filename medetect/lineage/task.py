"""The lineage task (``task: lineage``): every step of the lecture trained on one dataset into one folder."""

from __future__ import annotations

from pathlib import Path

from ..engine.tasks import Task
from .config import LineageConfig

__all__ = ["TASK"]


def _train(cfg, run_dir: Path, *, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False,
           device=None, **kw) -> dict:
    from .train import train_lineage

    summary = train_lineage(cfg, run_dir, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change,
                            device=device or "cpu")
    return {k: {kk: v.get(kk) for kk in ("status", "train_seconds", "error") if kk in v}
            for k, v in summary.get("steps", {}).items()}


TASK = Task(
    name="lineage",
    summary="The lecture's lineage on one dataset: classification + localisation, OverFeat, selective search, R-CNN, "
            "Fast R-CNN, Faster R-CNN and the one-stage rows, compared in one table (mAP, proposals, times).",
    config=LineageConfig,
    model_kinds=("localizer", "rcnn", "detector"),
    train=_train,
    predict_note="lineage models (the localizer, R-CNN, Fast R-CNN with selective search) run through medetect "
                 "lineage evaluate",
    evaluate_note="the lineage's table comes from medetect lineage evaluate",
)
