"""One loader for model files and training run folders: :func:`load_model` (the model-file layer,
:mod:`medetect.models.io`, reads files; a run folder's newest intact checkpoint and its config are resolved here,
because the checkpoint layout belongs to :mod:`medetect.engine`, a layer above the models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.checkpoint import latest_checkpoint  # the one place that knows the checkpoint layout
from ..engine.curves import read_best
from ..models.io import (FORMAT_VERSION, LoadedModel, Preprocess, _detector_preprocess_v1, fpr_preprocess,
                         load_from_metadata, load_model as load_model_file)

__all__ = ["load_model", "run_metadata"]


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
    if (run_dir / "attention_config.json").is_file():  # the attention task stores its preprocess and classes
        raw = json.loads((run_dir / "attention_config.json").read_text())
        cfg, kind = raw["model"], "attention"
        pre, classes = Preprocess.from_dict(raw["preprocess"]), list(raw["classes"])
    elif (run_dir / "fpr_config.json").is_file():
        cfg = json.loads((run_dir / "fpr_config.json").read_text())["model"]
        kind, pre, classes = "fpr", fpr_preprocess(cfg), ["nodule"]
    elif (run_dir / "config.json").is_file():
        raw = json.loads((run_dir / "config.json").read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise ValueError(f"{run_dir / 'config.json'}: no 'model' section")
        cfg = raw["model"]
        kind = "detector"
        if "preprocess" in raw:  # LUNA stage-one run: spacing + HU window
            pre = _detector_preprocess_v1(cfg, {}, {"luna": raw["preprocess"]})
        else:
            data = raw.get("data") or {}
            pre = _detector_preprocess_v1(cfg, {k: data[k] for k in ("scale", "max_value", "mean", "std") if k in data}, {})
        classes = list(cfg.get("class_names") or [str(i) for i in range(int(cfg.get("num_classes", 1)))])
    else:
        raise FileNotFoundError(f"{run_dir}: a run folder needs config.json (detector) or fpr_config.json (fpr)")
    state = {}
    if chosen:
        state = {"epoch": chosen.get("epoch"), "step": chosen.get("step")}
    elif (Path(ckpt) / "state.json").is_file():
        state = json.loads((Path(ckpt) / "state.json").read_text())
    extra = {"run": run_dir.name, "epoch": state.get("epoch"), "step": state.get("step")}
    if chosen:
        extra["best"] = {"metric": chosen.get("metric"), "value": chosen.get("value")}
    meta = {"format_version": str(FORMAT_VERSION), "kind": kind, "config": json.dumps(cfg),
            "preprocess": json.dumps(pre.to_dict()), "classes": json.dumps(classes), "extra": json.dumps(extra)}
    return meta, weights
