"""``medetect train CONFIG``: one entry for every pipeline. The YAML's ``task:`` picks the trainer
(:data:`TRAINERS`, a plain dict): ``detection`` (2D/3D detector on an annotated folder), ``luna-detection`` (LUNA16
stage one, then its ``data.test_subset`` predicted and scored), ``luna-fpr`` (LUNA16 stage two). Every trainer
follows the run folder rules of :func:`medetect.engine.runs.prepare_run_dir` (refuse a used folder unless
``resume``/``overwrite``, record config changes) and returns a summary dict (the last metrics row, the weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

__all__ = ["TRAINERS", "train"]


def _detection(cfg, run_dir: Path, **kw) -> dict:
    from ..experiment import run_training

    history = run_training(cfg, run_dir, **kw)
    return dict(history[-1]) if history else {}


def _luna_detection(cfg, run_dir: Path, *, device=None, **kw) -> dict:
    from ..luna.detection import (LunaLayout, _froc_summary, evaluate_submission, load_luna_model, predict_layout,
                                  train_detector, write_submission)

    dc = cfg.data
    if not dc.root:
        raise ValueError("data.root is not set: give the LUNA16 folder in the config, as ROOT or with --set data.root=...")
    layout = LunaLayout(dc.root, allow_missing_scans=dc.allow_missing_scans)
    w = train_detector(layout, run_dir, config=cfg, device=device or "cpu", **kw)
    out: dict[str, Any] = {"weights": str(w)}
    if dc.test_subset:
        model, pre = load_luna_model(w)
        test = layout.uids_in([dc.test_subset])
        sub = write_submission(Path(run_dir) / "submission.csv", predict_layout(model, pre, layout, test,
                                                                               **cfg.predict.kwargs()))
        out["submission"] = str(sub)
        out["test_froc"] = _froc_summary(evaluate_submission(layout, sub, test))
    return out


def _luna_fpr(cfg, run_dir: Path, **kw) -> dict:
    from ..luna.fpr import train_fpr

    _, history = train_fpr(run_dir=run_dir, config=cfg, **kw)
    return {**(history[-1] if history else {}), "weights": str(Path(run_dir) / "model.safetensors")}


def _attention(cfg, run_dir: Path, **kw) -> dict:
    from ..attention.train import train_attention

    return train_attention(cfg, run_dir, **kw)


def _organs(cfg, run_dir: Path, **kw) -> dict:
    from ..organs.localiser import train_organs

    w, history = train_organs(cfg, run_dir, **kw)
    return {**(history[-1] if history else {}), "weights": str(w)}


def _lineage(cfg, run_dir: Path, *, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False,
             device=None, **kw) -> dict:
    from ..lineage.train import train_lineage

    summary = train_lineage(cfg, run_dir, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change,
                            device=device or "cpu")
    return {k: {kk: v.get(kk) for kk in ("status", "train_seconds", "error") if kk in v}
            for k, v in summary.get("steps", {}).items()}


TRAINERS: dict[str, Callable[..., dict]] = {
    "detection": _detection,
    "luna-detection": _luna_detection,
    "luna-fpr": _luna_fpr,
    "attention": _attention,
    "organ-localisation": _organs,
    "lineage": _lineage,
}


def train(cfg, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          allow_config_change: bool = False, device=None) -> dict:
    """Train what ``cfg`` (from :func:`medetect.config.load_config`) describes into ``run_dir``."""
    task = getattr(cfg, "task", "detection")
    if task not in TRAINERS:
        raise ValueError(f"task must be one of {sorted(TRAINERS)}, got {task!r}")
    if task != "detection" and getattr(getattr(cfg, "train", None), "hard_negative_images", 0):
        raise ValueError(f"train.hard_negative_images (mining box-free images) works with task: detection, this "
                         f"config's task is {task!r}")
    return TRAINERS[task](cfg, Path(run_dir), resume=resume, overwrite=overwrite,
                          allow_config_change=allow_config_change, device=device)
