"""Tests for medetect.config: YAML -> typed dataclasses, with errors that name the offending key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medetect.config import DataConfig, ExperimentConfig, config_from_dict, load_config
from medetect.engine.trainer import TrainConfig
from medetect.models.detector import DetectorConfig, build_detector

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

GOOD = """
model:
  arch: retinanet
  ndim: 3
  in_channels: 1
  num_classes: 2
  class_names: [nodule, mass]
  backbone: resnet34
  base_width: 16
  stem_stride: [1, 2, 2]
  levels: [2, 3]
  anchor_sizes: [[8, 12], [16, 24]]
  score_thresh: 0.1
train:
  epochs: 3
  optimizer: adamw
  lr: 0.0005
  grad_clip: 0
data:
  dataset: voc
  root: data/voc
  classes: [nodule, mass]
  hflip: false
  random_scale: [0.9, 1.1]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_load_a_full_config(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert isinstance(cfg, ExperimentConfig)
    m, t, d = cfg.model, cfg.train, cfg.data
    assert isinstance(m, DetectorConfig) and isinstance(t, TrainConfig) and isinstance(d, DataConfig)
    assert (m.arch, m.ndim, m.num_classes, m.backbone, m.base_width) == ("retinanet", 3, 2, "resnet34", 16)
    assert m.stem_stride == [1, 2, 2] and m.anchor_sizes == [[8.0, 12.0], [16.0, 24.0]]
    assert all(isinstance(x, float) for lvl in m.anchor_sizes for x in lvl)  # ints in YAML become floats
    assert isinstance(m.score_thresh, float) and m.score_thresh == 0.1
    assert (t.epochs, t.optimizer, t.lr) == (3, "adamw", 0.0005) and isinstance(t.grad_clip, float)
    assert t.batch_size == TrainConfig().batch_size  # not given: the default
    assert d.hflip is False and d.vflip is True and d.classes == ["nodule", "mass"]
    assert Path(d.root) == (tmp_path / "data" / "voc").resolve()  # relative to the YAML's folder
    model = build_detector(m)  # the loaded config builds
    assert model.config is m


def test_empty_and_partial_files_give_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.model == DetectorConfig() and cfg.train == TrainConfig()
    cfg = load_config(_write(tmp_path, "model:\ntrain:\n  epochs: 2\n"))
    assert cfg.model == DetectorConfig() and cfg.train.epochs == 2


def test_unknown_key_names_it_and_lists_allowed_keys(tmp_path):
    path = _write(tmp_path, GOOD.replace("  backbone: resnet34", "  backbne: resnet34"))
    with pytest.raises(ValueError) as e:
        load_config(path)
    msg = str(e.value)
    assert "model.backbne" in msg
    assert str(path) in msg  # which file
    allowed = re.search(r"allowed keys in model: \[(.*)\]", msg)
    assert allowed, msg
    for key in ("backbone", "arch", "num_classes", "anchor_sizes"):
        assert f"'{key}'" in allowed.group(1)


@pytest.mark.parametrize("section,key", [("train", "epoch"), ("data", "augment")])
def test_unknown_key_in_other_sections(section, key):
    with pytest.raises(ValueError, match=rf"{section}\.{key}\b.*allowed keys in {section}"):
        config_from_dict({section: {key: 1}})


def test_unknown_section():
    with pytest.raises(ValueError, match=r"unknown config key modle; allowed keys: \['data', 'model', 'task', 'train'\]"):
        config_from_dict({"modle": {}})


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"model": {"num_classes": "three"}}, "model.num_classes"),
        ({"model": {"num_classes": 2.5}}, "model.num_classes"),
        ({"model": {"ndim": True}}, "model.ndim"),
        ({"model": {"backbone": 18}}, "model.backbone"),
        ({"model": {"levels": [2, "x"]}}, r"model.levels\[1\]"),
        ({"model": {"levels": 2}}, "model.levels"),
        ({"model": {"anchor_sizes": [[8], ["big"]]}}, r"model.anchor_sizes\[1\]\[0\]"),
        ({"model": {"stem_stride": "two"}}, "model.stem_stride"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"epochs": 2.0}}, "train.epochs"),
        ({"train": {"extra": [1]}}, "train.extra"),
        ({"data": {"hflip": "yes"}}, "data.hflip"),
        ({"data": {"mean": 0.5}}, "data.mean"),
        ({"model": "resnet18"}, "model"),
    ],
)
def test_wrong_type_names_the_key(raw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"train": {"optimizer": "adam"}}, "train.optimizer"),
        ({"train": {"schedule": "poly"}}, "train.schedule"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"data": {"dataset": "coco"}}, "data.dataset"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_bad_model_values_fail_at_load_naming_the_file_and_key(tmp_path):
    """Bad model choices are caught when the YAML is loaded (before any data is read), and again at build time for
    configs made in code."""
    path = _write(tmp_path, "model:\n  backbone: resnet101\n")
    with pytest.raises(ValueError, match=r"\.yaml: model\.backbone must be one of"):
        load_config(path)
    from medetect.models.detector import DetectorConfig

    with pytest.raises(ValueError, match=r"model\.backbone"):
        build_detector(DetectorConfig(backbone="resnet101"))


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ValueError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_round_trip_through_to_dict(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    cfg.train.validate()
    model = build_detector(cfg.model)
    assert model.config.num_classes == cfg.model.num_classes
    if cfg.model.class_names:
        assert len(cfg.model.class_names) == cfg.model.num_classes
    assert Path(cfg.data.root).is_absolute()


def test_there_are_shipped_configs():
    assert CONFIGS, "configs/*.yaml is empty"
