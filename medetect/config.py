"""Typed experiment configs loaded from YAML, with errors that name the key and the allowed values.

An experiment YAML has three sections, each a dataclass: ``model`` (:class:`~medetect.models.detector.DetectorConfig`),
``train`` (:class:`~medetect.engine.trainer.TrainConfig`) and ``data`` (:class:`DataConfig`). Unknown keys are errors
(a typo never silently falls back to a default).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine.trainer import TrainConfig
from .models.detector import DetectorConfig

__all__ = ["DataConfig", "ExperimentConfig", "load_config", "config_from_dict", "DATASETS"]

DATASETS = ("voc", "bccd", "dsb2018", "mini_mias")


@dataclass
class DataConfig:
    dataset: str = "voc"  # one of DATASETS (a Pascal VOC folder, or a named loader)
    root: str = "../shared/data/bccd"  # dataset folder; relative paths are relative to the YAML file's folder
    classes: list[str] = field(default_factory=list)  # class names (VOC: required; named loaders know theirs)
    train_split: str = "train"
    val_split: str = "val"
    scale: float = 1.0  # resize factor applied to every image (and box) before anything else
    hflip: bool = True  # random horizontal flip (p = 0.5)
    vflip: bool = True  # random vertical flip (microscopy has no up/down)
    rot90: bool = False  # random 90-degree rotations in the image plane
    random_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # zoom range for augmentation
    intensity: bool = True  # brightness / contrast jitter
    mean: list[float] = field(default_factory=lambda: [0.5])  # normalisation after scaling pixel values to [0, 1]
    std: list[float] = field(default_factory=lambda: [0.25])
    max_value: float = 255.0  # pixel value that maps to 1.0
    cache: bool = True  # keep decoded images in memory


@dataclass
class ExperimentConfig:
    model: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError) as e:
                errs.append(str(e))
        raise ValueError(f"{key}: {value!r} does not fit {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
    return value


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}.{unknown[0]}; allowed keys in {prefix}: {sorted(names)}")
    kw = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in raw.items()}
    return cls(**kw)


def config_from_dict(raw: dict, base_dir: Path | None = None) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"the config must be a mapping with sections model, train, data; got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"model", "train", "data"})
    if unknown:
        raise ValueError(f"unknown config section {unknown[0]!r}; allowed: ['data', 'model', 'train']")
    cfg = ExperimentConfig(
        model=_build(DetectorConfig, raw.get("model"), "model"),
        train=_build(TrainConfig, raw.get("train"), "train"),
        data=_build(DataConfig, raw.get("data"), "data"),
    )
    cfg.train.validate()
    cfg.model.validate()
    if cfg.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {DATASETS}, got {cfg.data.dataset!r}")
    if base_dir is not None and not Path(cfg.data.root).is_absolute():
        cfg.data.root = str((base_dir / cfg.data.root).resolve())
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    try:
        return config_from_dict(raw or {}, base_dir=path.parent)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
