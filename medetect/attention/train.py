"""The ``attention`` task's trainer (``medetect train`` with ``task: attention``): run folder rules, the engine's
:class:`~medetect.engine.trainer.Trainer` (checkpoints, resume), val AUC / pointing game per epoch, and the model file
``RUN/model.safetensors`` (kind ``attention``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..models.io import Preprocess, save_model
from .config import AttentionTaskConfig
from ..data.folds import fold_of, lesion_fold
from ..data.lesion_folder import read_lesion_folder
from .data import CLASSES, LesionImages, attention_collate

__all__ = ["preprocess_of", "train_attention", "score_dataset"]


def preprocess_of(cfg: AttentionTaskConfig) -> Preprocess:
    d = cfg.data
    return Preprocess(ndim=cfg.model.ndim, channels=cfg.model.in_channels, max_value=d.max_value, mean=[d.mean],
                      std=[d.std], scale=d.scale, bit_depth=8 if d.max_value == 255 else None,
                      value_range=[0.0, d.max_value])


def score_dataset(model, data: LesionImages, *, method: str = "attention", batch_size: int = 8) -> dict:
    """Probabilities, saliency maps (prepared grid) and circles (prepared grid, pixels) of every image of ``data``."""
    from .infer import saliency

    dev = next(model.parameters()).device
    probs, sals = [], []
    for a in range(0, len(data), batch_size):  # batches of images
        x = torch.stack([data.prepared(i)[0] for i in range(a, min(len(data), a + batch_size))]).to(dev)
        p, s = saliency(model, x, method)
        probs.append(p.cpu())
        sals.extend(s.cpu())
    circles = [data.circles(i) for i in range(len(data))]
    return {"scores": torch.cat(probs).numpy(), "labels": np.stack([r.labels for r in data.records]),
            "saliencies": [s.numpy() for s in sals], "centres": [c[0] for c in circles],
            "radii": [c[1] for c in circles], "spacings": [c[2] for c in circles],
            "patients": [r.patient for r in data.records]}


def _val_metrics(method: str):
    from ..evaluation.attention import attention_metrics

    def evaluate(model, data) -> dict:
        was = model.training
        r = score_dataset(model, data, method=method)
        model.train(was)
        # radii are in input pixels: spacing 1 / zoom turns them into prepared-grid voxels
        m = attention_metrics(r["scores"], r["labels"], r["saliencies"], r["centres"], r["radii"], r["patients"],
                              spacing=r["spacings"][0], n_boot=0)
        # the scalar metrics; an undefined one (None in the report) is NaN here, which the trainer skips
        return {f"val_{k}": float("nan") if v is None else v for k, v in m.items()
                if isinstance(v, float) or (v is None and k in m["undefined"])}

    return evaluate


def train_attention(cfg: AttentionTaskConfig, run_dir, *, resume: bool = False, overwrite: bool = False,
                    allow_config_change: bool = False, device=None, progress: bool = True) -> dict:
    from ..engine.runs import prepare_run_dir
    from ..engine.trainer import Trainer, seed_everything

    cfg.validate()
    d = cfg.data
    if not d.root:
        raise ValueError("data.root is not set: give the mini-MIAS-layout folder in the config or with --set data.root=...")
    pre = preprocess_of(cfg)
    spec = fold_of(d)
    if spec is not None:  # cross-validation: fold d.fold of the patients of both splits validates
        train_recs, val_recs = lesion_fold(d.root, spec)
    else:
        train_recs = read_lesion_folder(d.root, d.train_split)
        val_recs = read_lesion_folder(d.root, d.val_split) if d.val_split else []
    if cfg.model.num_classes != len(CLASSES):
        raise ValueError(f"model.num_classes must be {len(CLASSES)} ({', '.join(CLASSES)}) for a lesion folder, "
                         f"got {cfg.model.num_classes}")
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, {"model": cfg.model.to_dict(), "train": dataclasses.asdict(cfg.train),
                              "data": dataclasses.asdict(d), "preprocess": pre.to_dict(), "classes": list(CLASSES)},
                    resume=resume, overwrite=overwrite, allow_config_change=allow_config_change,
                    config_name="attention_config.json")
    train_data = LesionImages(train_recs, pre, flip=d.flip, sigma_factor=d.sigma_factor, seed=cfg.train.seed)
    val_data = LesionImages(val_recs, pre, sigma_factor=d.sigma_factor) if val_recs else None
    seed_everything(cfg.train.seed)
    from ..models.attention import build_attention

    model = build_attention(cfg.model)
    method = "gradcam" if cfg.model.attention == "none" else "attention"
    trainer = Trainer(model=model, train_data=train_data, config=cfg.train, run_dir=run_dir, val_data=val_data,
                      evaluate=_val_metrics(method) if val_data is not None else None, collate=attention_collate,
                      run_config={"attention": cfg.model.to_dict()}, device=device, progress=progress)
    if resume:
        trainer.resume()
    history = trainer.fit()
    w = save_model(model.eval(), run_dir / "model.safetensors", kind="attention", preprocess=pre, classes=list(CLASSES),
                   extra={"run": run_dir.name, "epochs": cfg.train.epochs, "data": str(d.root),
                          "train_split": d.train_split, "saliency": method,
                          **({"folds": d.folds, "fold": d.fold, "fold_seed": d.fold_seed} if spec else {})},
                   fp16=False)
    return {**(history[-1] if history else {}), "weights": str(w)}
