"""``medetect train CONFIG``: one entry for every task. The config's ``task:`` key picks the task in the registry
(:data:`medetect.apps.tasks.TASKS`), whose ``train`` follows the run folder rules of
:func:`medetect.engine.runs.prepare_run_dir` (refuse a used folder unless ``resume``/``overwrite``, record config
changes) and returns a summary dict (the last metrics row, the weights).

``medetect train CONFIG --folds K`` (:func:`train_folds`): K-fold cross-validation, one ordinary run folder per fold
and a summary of the folds' final validation metrics (mean, standard deviation, min, max)."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np

from ..data.folds import fold_sizes
from ..engine.curves import read_best
from ..engine.runs import config_diff, describe_diff, prepare_run_dir
from ..engine.trainer import json_safe
from ..files import read_json, write_text_atomically
from .tasks import TASKS, task_named

__all__ = ["CV_CONFIG", "CV_SUMMARY", "FOLD_DONE", "train", "train_folds", "cv_summary"]

_MINING_TASKS = ("detection", "mammography")  # trainers that mine hard negatives (medetect.detection.train)
CV_CONFIG = "cv_config.json"  # RUN/: the number of folds and the config every fold shares
CV_SUMMARY = "cv_summary.json"  # RUN/: the summary of train_folds (also cv_summary.md)
FOLD_DONE = "cv_fold.json"  # RUN/fold_k/: written once the fold's training returned: its config and summary
_NOT_METRICS = ("epoch", "step", "images_per_s")  # metrics.csv columns that are positions or speed, not metrics


def _task_of(cfg):
    task = task_named(getattr(cfg, "task", "detection"))
    if task.name not in _MINING_TASKS and getattr(getattr(cfg, "train", None), "hard_negative_images", 0):
        raise ValueError(f"train.hard_negative_images (mining box-free images) works with task: "
                         f"{' or '.join(_MINING_TASKS)}, this config's task is {task.name!r}")
    return task


def train(cfg, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          allow_config_change: bool = False, device=None) -> dict:
    """Train what ``cfg`` (from :func:`medetect.config.load_config`) describes into ``run_dir``."""
    task = _task_of(cfg)
    return task.train(cfg, Path(run_dir), resume=resume, overwrite=overwrite,
                      allow_config_change=allow_config_change, device=device)


# ----------------------------------------------------------------------------------------- cross-validation


def _has_folds(cfg) -> bool:
    return hasattr(getattr(cfg, "data", None), "folds")


def _as_json(obj) -> dict:
    return json.loads(json.dumps(json_safe(obj)))


def _prepare_cv_dir(root: Path, record: dict, defaults: dict, *, resume: bool, overwrite: bool,
                    allow_config_change: bool) -> None:
    """The cross-validation folder ``root``: like a run folder (:func:`~medetect.engine.runs.prepare_run_dir`), a
    used one is refused unless ``resume`` (same folds and config, or ``allow_config_change``) or ``overwrite`` (moved
    aside, never deleted); ``root/cv_config.json`` records the folds and the shared config."""
    if not resume:
        prepare_run_dir(root, record, resume=False, overwrite=overwrite, config_name=CV_CONFIG)
        return
    path = root / CV_CONFIG
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a run folder: pass another --run-dir")
    if root.is_dir() and any(root.iterdir()):
        if not path.is_file():
            raise ValueError(f"{root} holds no cross-validation run ({CV_CONFIG} is missing): pass another --run-dir, "
                             "or --overwrite to move it aside")
        old = read_json(path, "fix or remove it to resume these folds")
        diff = config_diff(old, record, defaults)
        if diff and not allow_config_change:
            raise ValueError(f"the folds or config differ from the ones {root} was trained with ({describe_diff(diff)}): "
                             "resume with the same ones, or pass --allow-config-change to record the change in each "
                             "fold and continue")
    write_text_atomically(path, json.dumps(record, indent=1))


def _finished(fold_dir: Path, config: dict, defaults: dict) -> bool:
    """Whether ``fold_dir`` holds a fold whose training returned with exactly ``config``."""
    path = fold_dir / FOLD_DONE
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and not config_diff(done.get("config", {}), config, defaults)


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _last_row(fold_dir: Path) -> dict:
    """The last row of the fold's ``metrics.csv`` (one row per epoch) that holds validation metrics (``val_*``; the
    last row when none does): its numbers, empty or undefined cells left out."""
    path = fold_dir / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"{path}: no such file; the fold logged no epoch")
    with open(path, newline="") as fh:
        rows = [{k: v for k, v in ((k, _number(t)) for k, t in r.items()) if v is not None} for r in csv.DictReader(fh)]
    if not rows:
        raise ValueError(f"{path}: no epoch row")
    validated = [r for r in rows if any(k.startswith("val_") for k in r)]
    return (validated or rows)[-1]


def cv_summary(run_dir: str | Path, folds: int, *, fold_seed: int = 0, held_out: list[dict] | None = None) -> dict:
    """The summary of the folds ``run_dir/fold_0 .. fold_{folds-1}``, written to ``run_dir/cv_summary.json``
    (atomically) and ``run_dir/cv_summary.md`` (a table) and returned:

    * ``folds``, ``fold_seed``, ``run_dir``;
    * ``per_fold``: one entry per fold: ``fold``, ``run_dir``, ``held_out`` (``images`` and ``groups``, i.e.
      patients, of its validation fold, when known), ``epoch`` and ``metrics`` of the fold's last ``metrics.csv``
      row with validation metrics (its numbers: the final ``val_*`` metrics, ``train_loss``; not ``step`` and
      ``images_per_s``) and ``best`` (``metric``, ``value``, ``epoch`` of the run's ``best.json``; null without one);
    * ``metrics``: for every numeric metric, ``mean``, ``std`` (sample standard deviation, n - 1 in the
      denominator; 0 for one value), ``min``, ``max`` over the folds and ``n``, the number of folds that have it
      (an undefined value, e.g. an AUC of a fold with one class, is left out)."""
    root = Path(run_dir)
    per_fold = []
    for k in range(folds):
        fold_dir = root / f"fold_{k}"
        row = _last_row(fold_dir)
        best = read_best(fold_dir)
        per_fold.append({
            "fold": k, "run_dir": str(fold_dir),
            "held_out": held_out[k] if held_out is not None else None,
            "epoch": int(row["epoch"]) if "epoch" in row else None,
            "metrics": {m: v for m, v in row.items() if m not in _NOT_METRICS},
            "best": {key: best[key] for key in ("metric", "value", "epoch")} if best is not None else None,
        })
    names = list(dict.fromkeys(m for f in per_fold for m in f["metrics"]))
    metrics = {}
    for m in names:
        v = np.asarray([f["metrics"][m] for f in per_fold if m in f["metrics"]], dtype=np.float64)
        metrics[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
    summary = {"folds": folds, "fold_seed": fold_seed, "run_dir": str(root), "per_fold": per_fold,
               "metrics": metrics}
    write_text_atomically(root / CV_SUMMARY, json.dumps(json_safe(summary), indent=1, allow_nan=False))
    write_text_atomically(root / "cv_summary.md", _markdown(summary))
    return summary


def _markdown(summary: dict) -> str:
    folds = summary["per_fold"]
    head = ["metric", *(f"fold {f['fold']}" for f in folds), "mean", "std", "min", "max"]
    lines = [f"# {summary['folds']}-fold cross-validation ({summary['run_dir']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in summary["metrics"].items():
        cells = [f"{f['metrics'][m]:.4g}" if m in f["metrics"] else "" for f in folds]
        cells += [f"{s[key]:.4g}" for key in ("mean", "std", "min", "max")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    best = [f for f in folds if f["best"] is not None]
    if best:
        lines += ["", "Best validation epoch per fold: " + ", ".join(
            f"fold {f['fold']}: epoch {f['best']['epoch']} ({f['best']['metric']} {f['best']['value']:.4g})"
            for f in best)]
    return "\n".join(lines) + "\n"


def train_folds(cfg, run_dir: str | Path, folds: int, *, resume: bool = False, overwrite: bool = False,
                allow_config_change: bool = False, device=None) -> dict:
    """K-fold cross-validation of ``cfg`` (``medetect train CONFIG --folds K``): the config's data section gets
    ``folds`` = K, and fold ``k`` (``data.fold`` = k: validated on the held-out fold k, trained on the others; the
    pool is ``train_split`` + ``val_split``, grouped by patient, :mod:`medetect.data.folds`) is trained into the
    ordinary run folder ``run_dir/fold_k``, one after the other. ``run_dir`` follows the run folder rules: a used one
    is refused unless ``resume`` or ``overwrite`` (moved aside whole). ``resume`` continues the unfinished folds and
    skips the finished ones (``fold_k/cv_fold.json``, written when the fold's training returned, with the same
    config). Then :func:`cv_summary` writes ``run_dir/cv_summary.json`` and ``cv_summary.md``; returns that summary.

    A task whose config has no fold keys, ``folds`` < 2, or a pool with fewer than K patients is refused (one
    sentence) before anything is written."""
    task = _task_of(cfg)
    if not _has_folds(cfg):
        able = [t.name for t in TASKS.values() if _has_folds(t.config())]
        raise ValueError(f"--folds: the {task.name} task has no cross-validation folds (its config has no data.folds; "
                         f"tasks with folds: {', '.join(able)})")
    if folds < 2:
        raise ValueError(f"--folds must be at least 2 (the number of folds), got {folds}")
    base = copy.deepcopy(cfg)
    base.data.folds, base.data.fold = int(folds), 0
    base.validate()
    held_out = fold_sizes(base.data)  # refuses a pool that cannot be split, before anything is written
    root = Path(run_dir)
    shared = _as_json(base.to_dict())
    del shared["data"]["fold"]
    defaults = _as_json(type(cfg)().to_dict())
    _prepare_cv_dir(root, {"folds": int(folds), "config": shared}, {"config": defaults}, resume=resume,
                    overwrite=overwrite, allow_config_change=allow_config_change)
    for k in range(folds):
        fold_cfg = copy.deepcopy(base)
        fold_cfg.data.fold = k
        fold_dir = root / f"fold_{k}"
        config = _as_json(fold_cfg.to_dict())
        if resume and _finished(fold_dir, config, defaults):
            print(f"fold {k + 1}/{folds}: {fold_dir} is finished; skipped", flush=True)
            continue
        h = held_out[k]
        print(f"fold {k + 1}/{folds}: validating on {h['images']} images ({h['groups']} patients or groups) -> "
              f"{fold_dir}", flush=True)
        started = fold_dir.is_dir() and any(fold_dir.iterdir())
        summary = train(fold_cfg, fold_dir, resume=resume and started, allow_config_change=allow_config_change,
                        device=device)
        write_text_atomically(fold_dir / FOLD_DONE, json.dumps({"config": config, "summary": json_safe(summary)},
                                                               indent=1, allow_nan=False))
    return cv_summary(root, folds, fold_seed=base.data.fold_seed, held_out=held_out)
