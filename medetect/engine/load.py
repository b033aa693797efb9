"""One loader for model files and training run folders: :func:`load_model`. The model-file layer
(:mod:`medetect.models.io`) reads files; a run folder's newest intact checkpoint (or best epoch) and the record of
what model it trains are resolved here, beside the checkpoint layout they belong to.

A run folder says what it trains in one of these records, read in this order:

``model.json``             ``{"kind", "config", "preprocess", "classes", "task"}``, the model file's metadata
                           (:func:`write_run_model_record`; written by the organ localiser and the 2D slice detector)
``attention_config.json``  the attention task (model config, preprocess, classes)
``fpr_config.json``        the LUNA16 stage two (false-positive reduction)
``config.json``            a detector run (``medetect train``): the model section, the data section's normalisation,
                           ``task`` (default ``detection``); a LUNA16 stage-one run adds its ``preprocess``
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import write_text_atomically
from ..models.io import (FORMAT_VERSION, LoadedModel, Preprocess, _detector_preprocess_v1, fpr_preprocess,
                         load_from_metadata, load_model as load_model_file)
from .checkpoint import latest_checkpoint  # the one place that knows the checkpoint layout
from .curves import read_best

__all__ = ["load_model", "run_metadata", "write_run_model_record", "RUN_MODEL_RECORD"]

RUN_MODEL_RECORD = "model.json"


def write_run_model_record(run_dir: str | os.PathLike, *, kind: str, config: dict, preprocess: Preprocess,
                           classes: list[str], task: str) -> Path:
    """Record in ``run_dir`` what model the run trains (the metadata its model file will carry), so that
    :func:`load_model` can load any of its checkpoints."""
    rec = {"kind": kind, "config": config, "preprocess": preprocess.to_dict(), "classes": list(classes), "task": task}
    return write_text_atomically(Path(run_dir) / RUN_MODEL_RECORD, json.dumps(rec, indent=1))


def load_model(path_or_run_dir: str | os.PathLike, device: str | torch.device | None = None, *,
               best: bool = False) -> LoadedModel:
    """A model file (any supported format) or a training run folder (its newest intact checkpoint + config; with
    ``best``, its best validation epoch, ``best.json``) -> a :class:`~medetect.models.io.LoadedModel` in eval mode on
    ``device`` (default CPU)."""
    path = Path(path_or_run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file or run folder")
    if path.is_dir():
        meta, weights = run_metadata(path, best=best)
        return load_from_metadata(meta, weights, path, device=device)
    if best:
        raise ValueError(f"{path}: best needs a training run folder (its best.json), not a model file")
    return load_model_file(path, device=device)


def run_metadata(run_dir: Path, *, best: bool = False) -> tuple[dict[str, str], Path]:
    """A training run folder -> (metadata in the current format, path of its newest checkpoint's weights, or with
    ``best`` of the best validation epoch's weights named by ``best.json``)."""
    chosen = read_best(run_dir) if best else None
    if best and chosen is None:
        raise FileNotFoundError(f"{run_dir}: no best.json: the run has not validated yet (data.val_split, "
                                "train.val_every)")
    ckpt = latest_checkpoint(run_dir) if not best else None
    if ckpt is None and not best:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint in this run folder")
    weights = Path(chosen["weights"]) if chosen else Path(ckpt) / "model.safetensors"
    if best and not weights.is_file():
        raise FileNotFoundError(f"{run_dir / 'best.json'}: its weights {weights} are missing")
    if (run_dir / RUN_MODEL_RECORD).is_file():
        raw = json.loads((run_dir / RUN_MODEL_RECORD).read_text())
        cfg, kind, task = raw["config"], raw["kind"], raw["task"]
        pre, classes = Preprocess.from_dict(raw["preprocess"]), list(raw["classes"])
    elif (run_dir / "attention_config.json").is_file():  # the attention task stores its preprocess and classes
        raw = json.loads((run_dir / "attention_config.json").read_text())
        cfg, kind, task = raw["model"], "attention", "attention"
        pre, classes = Preprocess.from_dict(raw["preprocess"]), list(raw["classes"])
    elif (run_dir / "fpr_config.json").is_file():
        cfg = json.loads((run_dir / "fpr_config.json").read_text())["model"]
        kind, pre, classes, task = "fpr", fpr_preprocess(cfg), ["nodule"], "luna-fpr"
    elif (run_dir / "config.json").is_file():
        raw = json.loads((run_dir / "config.json").read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise ValueError(f"{run_dir / 'config.json'}: no 'model' section")
        cfg = raw["model"]
        kind = "detector"
        task = str(raw.get("task") or "detection")
        if "preprocess" in raw:  # LUNA stage-one run: spacing + HU window
            pre = _detector_preprocess_v1(cfg, {}, {"luna": raw["preprocess"]})
            task = "luna-detection"
        else:
            data = raw.get("data") or {}
            pre = _detector_preprocess_v1(cfg, {k: data[k] for k in ("scale", "max_value", "mean", "std") if k in data}, {})
        classes = list(cfg.get("class_names") or [str(i) for i in range(int(cfg.get("num_classes", 1)))])
    else:
        raise FileNotFoundError(f"{run_dir}: a run folder needs model.json, config.json (detector), attention_config.json or fpr_config.json")
    state = {}
    if chosen:
        state = {"epoch": chosen.get("epoch"), "step": chosen.get("step")}
    elif (Path(ckpt) / "state.json").is_file():
        state = json.loads((Path(ckpt) / "state.json").read_text())
    extra = {"run": run_dir.name, "epoch": state.get("epoch"), "step": state.get("step")}
    if chosen:
        extra["best"] = {"metric": chosen.get("metric"), "value": chosen.get("value")}
    meta = {"format_version": str(FORMAT_VERSION), "kind": kind, "config": json.dumps(cfg), "task": task,
            "preprocess": json.dumps(pre.to_dict()), "classes": json.dumps(classes), "extra": json.dumps(extra)}
    return meta, weights
