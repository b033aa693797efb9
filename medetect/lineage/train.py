"""``medetect lineage train``: every step of the lineage on one dataset, into one folder.

The folder ``OUT`` holds ``config.json`` (the lineage config), per step ``<step>.safetensors`` (the one model file)
and ``<step>.json`` (its train record: seconds, figures, settings), ``runs/<step>/`` (checkpoints of the networks),
``cache/ss/`` (selective-search proposals, reused by R-CNN and Fast R-CNN) and ``lineage.json`` (the summary).

Run folder rules as for every trainer (:mod:`medetect.engine.runs`): a used folder is refused unless ``resume``
(finished steps, those with a model file and a record, are kept; an interrupted one resumes from its newest
checkpoint) or ``overwrite`` (the old folder is moved aside, never deleted). A step that fails on its data (say a class
without any training object) is recorded as failed with its one-sentence reason and the next step runs: the table
marks the row instead of stopping halfway.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path

import torch

from ..files import read_json, write_text_atomically
from ..engine.runs import _move_aside, config_diff
from ..schema import build_config
from .config import LineageConfig
from .data import LineageSet, load_split
from .steps import step

__all__ = ["train_lineage", "train_step", "prepare_lineage_dir", "load_lineage_config"]

CONFIG_FILE = "config.json"


def load_lineage_config(folder: str | Path) -> LineageConfig:
    """The lineage config stored in a lineage folder (``config.json``)."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a lineage folder: {CONFIG_FILE} is missing (train one with "
                                "medetect lineage train)")
    raw = read_json(file)
    try:
        return build_config(LineageConfig, raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def prepare_lineage_dir(out: Path, cfg: LineageConfig, *, resume: bool, overwrite: bool,
                        allow_config_change: bool) -> None:
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pass --resume to continue or --overwrite to "
                         "start afresh, not both")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a lineage folder: pass another --out")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not resume:
        if not overwrite:
            raise ValueError(f"{out} already holds a lineage run: pass --resume to continue it or --overwrite to move "
                             "it aside")
        moved = _move_aside(out)
        warnings.warn(f"moved the existing lineage folder {out} to {moved}", stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    file = out / CONFIG_FILE
    new = json.loads(json.dumps(cfg.to_dict()))
    if resume and file.is_file():
        old = json.loads(file.read_text())
        diff = config_diff(old, new, LineageConfig().to_dict())
        diff = [d for d in diff if d[0] != "steps"]  # training more or fewer steps is no change of any step
        if diff and not allow_config_change:
            shown = ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in diff[:5])
            raise ValueError(f"the config differs from the one {out} was trained with ({shown}): resume with the same "
                             "config, or pass --allow-config-change to continue anyway")
        if diff:
            with open(out / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "diff": [list(d) for d in diff]}) + "\n")
    write_text_atomically(file, json.dumps(new, indent=1))


def train_step(key: str, train: LineageSet, val: LineageSet | None, cfg: LineageConfig, out: Path, *,
               resume: bool = False, device="cpu", progress: bool = True) -> dict:
    """Train one step (``localizer``, ``rcnn``, ``fast_rcnn``, ``faster_rcnn``, ``yolo``, ``retinanet``)."""
    step(key)
    kw = dict(resume=resume, device=device, progress=progress)
    if key == "localizer":
        from .localizer import train_localizer

        return train_localizer(train, val, cfg.localizer, out, **kw)
    if key == "rcnn":
        from .rcnn import train_rcnn

        return train_rcnn(train, val, cfg.rcnn, out, proposals=cfg.proposals, **kw)
    from .detectors import train_detector_step

    if val is None:
        raise ValueError(f"the {key} step picks its best epoch on a validation split: set data.val_split (--val)")
    return train_detector_step(key, train, val, cfg.detectors, out, proposals=cfg.proposals, **kw)


def train_lineage(cfg: LineageConfig, out_dir: str | Path, *, steps=None, resume: bool = False,
                  overwrite: bool = False, allow_config_change: bool = False, device="cpu",
                  progress: bool = True) -> dict:
    """Train ``steps`` (default ``cfg.steps``) into ``out_dir``; returns the summary written to ``lineage.json``."""
    keys = list(steps or cfg.steps)
    for k in keys:
        step(k)
    d = cfg.data
    train = load_split(d.spec(d.train_split), scale=d.scale, classes=d.classes)  # data errors before the folder
    if len(train) == 0 or train.num_objects == 0:
        raise ValueError(f"{d.spec(d.train_split)} has {len(train)} images and no annotated object: the lineage has "
                         "nothing to learn from")
    val = load_split(d.spec(d.val_split), scale=d.scale, classes=d.classes) if d.val_split else None
    out = Path(out_dir)
    prepare_lineage_dir(out, cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    summary_file = out / "lineage.json"
    summary = json.loads(summary_file.read_text()) if resume and summary_file.is_file() else {}
    records = dict(summary.get("steps", {}))

    def write() -> dict:
        summary = {"config": cfg.to_dict(), "data": {"train": train.spec, "val": val.spec if val else None,
                                                     "train_images": len(train), "train_objects": train.num_objects},
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                   "steps": records}
        write_text_atomically(summary_file, json.dumps(summary, indent=1, default=str))
        return summary

    for key in keys:
        weights, rec_file = out / f"{key}.safetensors", out / f"{key}.json"
        if resume and weights.is_file() and rec_file.is_file():
            records[key] = {**json.loads(rec_file.read_text()), "status": "trained"}
            print(f"lineage: {key} already trained in {out}; kept", flush=True)
            continue
        print(f"lineage: training {key}", flush=True)
        t0 = time.perf_counter()
        try:
            rec = train_step(key, train, val, cfg, out, resume=resume, device=device, progress=progress)
            records[key] = {**rec, "status": "trained"}
        except ValueError as e:  # a data problem of this step: marked, the others still run
            warnings.warn(f"lineage step {key} failed: {e}", stacklevel=2)
            records[key] = {"status": "failed", "error": str(e), "seconds": time.perf_counter() - t0}
        write()
    summary = write()
    return summary
