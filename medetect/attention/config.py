"""Typed config of the ``attention`` task (``medetect train configs/mias_attention.yaml``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.folds import FOLD_DOC, FOLD_SEED_DOC, FOLDS_DOC, check_fold_keys
from ..engine.trainer import TrainConfig
from ..heatmaps import SIGMA_FACTOR
from ..models.attention import AttentionConfig
from ..schema import check, option

__all__ = ["AttentionDataConfig", "AttentionTaskConfig", "default_attention_train_config"]


def default_attention_train_config() -> TrainConfig:
    return TrainConfig(epochs=30, batch_size=8, lr=1e-3, optimizer="adamw", warmup_iters=20, num_workers=0,
                       weight_decay=1e-4, log_every=10, seed=0)


@dataclass
class AttentionDataConfig:
    root: str = option("", doc="mini-MIAS-layout folder (images.csv, annotations.csv, <split>.txt)", path=True)
    train_split: str = option("train", doc="split trained on")
    val_split: str = option("val", doc="split scored after each epoch (empty: none)")
    scale: float = option(0.25, doc="resize factor of the images (0.25: 1024 -> 256 for mini-MIAS)", gt=0, le=1)
    max_value: float = option(255.0, doc="raw value mapped to 1 before mean/std", gt=0)
    mean: float = option(0.25, doc="intensity mean after / max_value", ge=0)
    std: float = option(0.25, doc="intensity std after / max_value", gt=0)
    sigma_factor: float = option(SIGMA_FACTOR, doc="Gaussian sigma = sigma_factor x lesion diameter", gt=0)
    flip: bool = option(True, doc="random flips along every axis (training)")
    folds: int = option(0, doc=FOLDS_DOC, ge=0)
    fold: int = option(0, doc=FOLD_DOC, ge=0)
    fold_seed: int = option(0, doc=FOLD_SEED_DOC, ge=0)

    def validate(self, prefix: str = "data") -> None:
        check(self, prefix)
        check_fold_keys(self.folds, self.fold, self.train_split, self.val_split, prefix)


@dataclass
class AttentionTaskConfig:
    task: str = option("attention", doc="selects this schema", choices=("attention",))
    data: AttentionDataConfig = option(default_factory=AttentionDataConfig, doc="folder, splits, resize, heatmaps")
    model: AttentionConfig = option(default_factory=AttentionConfig, doc="the attention classifier")
    train: TrainConfig = option(default_factory=default_attention_train_config, doc="optimisation")

    def validate(self, prefix: str = "") -> None:
        check(self, prefix)
        if self.model.ndim != 2 or self.model.in_channels != 1:
            p = f"{prefix}.model" if prefix else "model"
            raise ValueError(f"{p}.ndim must be 2 and {p}.in_channels 1 for a mini-MIAS-layout folder (2D grey images "
                             f"with lesion circles), got ndim {self.model.ndim} and in_channels "
                             f"{self.model.in_channels}; 3D cubes: experiments/attention_luna_cubes.py")

    def to_dict(self) -> dict:
        return asdict(self)
