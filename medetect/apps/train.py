"""``medetect train CONFIG``: one entry for every task. The config's ``task:`` key picks the task in the registry
(:data:`medetect.apps.tasks.TASKS`), whose ``train`` follows the run folder rules of
:func:`medetect.engine.runs.prepare_run_dir` (refuse a used folder unless ``resume``/``overwrite``, record config
changes) and returns a summary dict (the last metrics row, the weights)."""

from __future__ import annotations

from pathlib import Path

from .tasks import task_named

__all__ = ["train"]

_MINING_TASKS = ("detection", "mammography")  # trainers that mine hard negatives (medetect.detection.train)


def train(cfg, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          allow_config_change: bool = False, device=None) -> dict:
    """Train what ``cfg`` (from :func:`medetect.config.load_config`) describes into ``run_dir``."""
    task = task_named(getattr(cfg, "task", "detection"))
    if task.name not in _MINING_TASKS and getattr(getattr(cfg, "train", None), "hard_negative_images", 0):
        raise ValueError(f"train.hard_negative_images (mining box-free images) works with task: "
                         f"{' or '.join(_MINING_TASKS)}, this config's task is {task.name!r}")
    return task.train(cfg, Path(run_dir), resume=resume, overwrite=overwrite,
                      allow_config_change=allow_config_change, device=device)
