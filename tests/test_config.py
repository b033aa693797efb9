"""Tests for medetect.config: YAML -> typed dataclasses, with errors that name the offending key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from medetect.config import DataConfig, ExperimentConfig, config_from_dict, config_reference, load_config
from medetect.engine.trainer import TrainConfig
from medetect.luna.config import LunaDetectionConfig, LunaFPRConfig
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.fp_reduction import FPRConfig
from medetect.schema import apply_overrides, check, expand_env, from_dict, reference

REPO = Path(__file__).resolve().parents[1]

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

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
    if cfg.task == "attention":
        from medetect.models.attention import build_attention

        assert build_attention(cfg.model).config is cfg.model and Path(cfg.data.root).is_absolute()
        return
    if cfg.task == "lineage":  # every step's network builds from its section
        from medetect.lineage.config import LineageConfig
        from medetect.models.localizer import build_localizer

        assert cfg.to_dict() == {**LineageConfig().to_dict(), "data": cfg.data.to_dict()}
        assert Path(cfg.data.root).is_absolute() and build_localizer(cfg.localizer.model_config(3, 3)) is not None
        for step in ("fast_rcnn", "faster_rcnn", "yolo", "retinanet"):
            assert build_detector(cfg.detectors.step_model(step, cfg.data.classes)).config.arch == step
        return
    from medetect.organs.config import OrganLocalisationConfig

    assert isinstance(cfg, (ExperimentConfig, LunaDetectionConfig, LunaFPRConfig, OrganLocalisationConfig))
    if isinstance(cfg, LunaFPRConfig):
        from medetect.models.fp_reduction import build_fpr

        assert build_fpr(cfg.model).config is cfg.model
        assert Path(cfg.data.root).is_absolute() and Path(cfg.data.candidates).is_absolute()
        return
    model = build_detector(cfg.model)
    assert model.config.num_classes == cfg.model.num_classes
    if cfg.model.class_names:
        assert len(cfg.model.class_names) == cfg.model.num_classes
    if isinstance(cfg, OrganLocalisationConfig) and not cfg.data.root:
        return  # the organ localiser generates its phantoms into the run folder
    assert Path(cfg.data.root).is_absolute()


def test_there_are_shipped_configs():
    assert CONFIGS, "configs/*.yaml is empty"


# ============================================================================================ ranges at load time


@pytest.mark.parametrize(
    "text,message",
    [
        ("data:\n  scale: -1\n", r"data\.scale must be > 0, got -1"),
        ("data:\n  std: [0]\n", r"data\.std\[0\] must be > 0, got 0"),
        ("data:\n  std: [0.2, -1]\n", r"data\.std\[1\] must be > 0, got -1"),
        ("data:\n  max_value: 0\n", r"data\.max_value must be > 0"),
        ("data:\n  random_scale: [1.2, 0.8]\n", r"data\.random_scale must be \[lo, hi\] with lo <= hi"),
        ("train:\n  grad_clip: -5\n", r"train\.grad_clip must be >= 0, got -5"),
        ("train:\n  lr: 0\n", r"train\.lr must be > 0, got 0"),
        ("train:\n  batch_size: 0\n", r"train\.batch_size must be >= 1, got 0"),
        ("train:\n  num_workers: -1\n", r"train\.num_workers must be >= 0, got -1"),
        ("train:\n  lr: .nan\n", r"train\.lr must be > 0, got nan"),
        ("model:\n  nms_thresh: 1.5\n", r"model\.nms_thresh must be in \[0, 1\], got 1.5"),
        ("model:\n  rpn_nms_thresh: -0.1\n", r"model\.rpn_nms_thresh must be in \[0, 1\]"),
        ("model:\n  score_thresh: 2\n", r"model\.score_thresh must be in \[0, 1\], got 2"),
        ("model:\n  anchor_sizes: [[32], [0], [128], [256]]\n", r"model\.anchor_sizes\[1\]\[0\] must be > 0, got 0"),
        ("model:\n  levels: [2, 3]\n", r"model\.anchor_sizes must have one entry per level"),
        ("model:\n  stem_stride: [1, 2, 2]\n", r"model\.stem_stride must be one number or 2"),
        ("model:\n  class_names: [a, b]\n", r"model\.class_names must name all model\.num_classes = 1"),
        ("task: luna-detection\npredict:\n  tile_size: 0\n", r"predict\.tile_size must be >= 1, got 0"),
        ("task: luna-detection\ndata:\n  patch_size: [64, 0, 64]\n", r"data\.patch_size\[1\] must be >= 1, got 0"),
        ("task: luna-detection\ndata:\n  pos_prob: 1.5\n", r"data\.pos_prob must be in \[0, 1\], got 1.5"),
        ("task: luna-detection\npreprocess:\n  spacing: 0\n", r"preprocess\.spacing must be > 0, got 0"),
        ("task: luna-detection\npreprocess:\n  hu_lo: 400\n", r"preprocess\.hu_lo must be < preprocess\.hu_hi"),
        ("task: luna-detection\nmodel:\n  in_channels: 2\n", r"model\.ndim must be 3 and model\.in_channels 1"),
        ("task: luna-fpr\nmodel:\n  hu_window: [400, -1000]\n", r"model\.hu_window must be \[lo, hi\] with lo < hi"),
        ("task: luna-fpr\nmodel:\n  spacing_mm: 0\n", r"model\.spacing_mm must be > 0, got 0"),
        ("task: luna-fpr\nmodel:\n  dropout: 1\n", r"model\.dropout must be in \[0, 1\), got 1"),
        ("task: luna-fpr\nscore:\n  fuse: max\n", r"score\.fuse must be one of \['product'"),
        ("task: luna-fpr\ndata:\n  pos_fraction: 0\n", r"data\.pos_fraction must be in \(0, 1\), got 0"),
        ("task: luna-fpr\nmodel:\n  scales: [1, 2]\n  in_channels: 1\n", r"model\.in_channels \(1\) must equal"),
        ("task: detect\n", r"task must be one of \['detection', 'mammography', 'attention', 'organ-localisation', 'luna-detection', 'luna-fpr', 'lineage'\], got 'detect'"),
    ],
)
def test_bad_values_fail_at_load_naming_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}") as e:
        load_config(path)
    assert "\n" not in str(e.value)  # one sentence for the CLI
    assert not (tmp_path / "runs").exists()


def test_grad_clip_zero_disables_and_null_is_refused():
    assert config_from_dict({"train": {"grad_clip": 0}}).train.grad_clip == 0.0
    with pytest.raises(ValueError, match=r"^train\.grad_clip must be a number, got null$"):
        config_from_dict({"train": {"grad_clip": None}})


def test_check_refuses_null_unless_optional_and_checks_configs_made_in_code():
    with pytest.raises(ValueError, match=r"^train\.lr must be a number, got null$"):
        check(TrainConfig(lr=None), "train")
    check(DetectorConfig(anchor_shapes=None), "model")  # Optional: fine
    with pytest.raises(ValueError, match=r"model\.nms_thresh must be in \[0, 1\], got 2"):
        build_detector(DetectorConfig(nms_thresh=2.0))  # build_detector validates ranges too
    with pytest.raises(ValueError, match=r"fpr\.widths\[1\] must be >= 1, got 0"):
        FPRConfig(widths=[4, 0]).validate()
    with pytest.raises(ValueError, match=r"train\.epochs must be >= 1, got 0"):
        TrainConfig(epochs=0).validate()


def test_wrong_types_in_luna_configs():
    with pytest.raises(ValueError, match=r"^preprocess\.spacing must be a list of number or a number, got .fine.$"):
        config_from_dict({"task": "luna-detection", "preprocess": {"spacing": "fine"}})
    with pytest.raises(ValueError, match=r"^unknown config key data\.cube; allowed keys in data: \["):
        config_from_dict({"task": "luna-fpr", "data": {"cube": 32}})
    with pytest.raises(ValueError, match=r"^model must be a mapping of keys, got 3$"):
        config_from_dict({"task": "luna-fpr", "model": 3})


# ============================================================================================ --set overrides


def test_overrides_nested_lists_and_yaml_values(tmp_path):
    path = _write(tmp_path, GOOD)
    cfg = load_config(path, ["train.lr=1e-3", "model.levels=[2, 3, 4]",
                             "model.anchor_sizes=[[8], [16], [32]]", "data.hflip=true", "train.extra.note=hi",
                             "data.classes=[a, b]", "model.class_names=[a, b]"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.levels == [2, 3, 4] and cfg.model.anchor_sizes == [[8.0], [16.0], [32.0]]
    assert cfg.data.hflip is True and cfg.train.extra == {"note": "hi"} and cfg.data.classes == ["a", "b"]
    assert cfg.model.arch == "retinanet"  # untouched keys keep the file's values
    # an override into an absent section creates it
    raw = apply_overrides({}, ["train.epochs=3"])
    assert raw == {"train": {"epochs": 3}}


def test_override_selects_task_and_sets_null(tmp_path):
    path = _write(tmp_path, "data:\n  root: data\n")
    cfg = load_config(path, ["task=luna-fpr", "model.scales=[1, 2]", "data.pos_fraction=null"])
    assert isinstance(cfg, LunaFPRConfig)
    assert cfg.model.in_channels == 2  # follows the scales unless given
    assert cfg.data.pos_fraction is None
    assert cfg.data.root == str((tmp_path / "data").resolve())


@pytest.mark.parametrize(
    "sets,message",
    [
        (["train.epoch=3"], r"--set train\.epoch: unknown config key train\.epoch; allowed keys in train: \["),
        (["modle.arch=retinanet"], r"--set modle\.arch: unknown config key modle; allowed keys: \["),
        (["train.lr.x=1"], r"--set train\.lr\.x: train\.lr is a number, it has no sub-key 'x'"),
        (["train.lr"], r"--set 'train\.lr' must have the form key\.sub=value"),
        (["train..lr=1"], r"--set 'train\.\.lr=1' has an empty key"),
        (["model.levels=[2, 3"], r"--set model\.levels: the value '\[2, 3' is not valid YAML"),
        (["train.lr=fast"], r"train\.lr must be a number, got 'fast'"),
        (["train.grad_clip=-5"], r"train\.grad_clip must be >= 0, got -5"),
        (["task=luna-fpr", "model.arch=retinanet"], r"--set model\.arch: unknown config key model\.arch"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, sets, message):
    path = _write(tmp_path, "train:\n  epochs: 2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        load_config(path, sets)


# ============================================================================================ environment, paths


def test_env_expansion_with_defaults():
    env = {"A": "/data", "EMPTY": ""}
    assert expand_env("${A}/luna", env=env) == "/data/luna"
    assert expand_env("${B:-../x}/luna", env=env) == "../x/luna"
    assert expand_env("${EMPTY:-d}", env=env) == "d"  # as in the shell: empty counts as unset
    assert expand_env("${A:-d}/${B:-e}", env=env) == "/data/e"
    assert expand_env("$A stays", env=env) == "$A stays"
    with pytest.raises(ValueError, match=r"^data\.root: environment variable B is not set"):
        expand_env("${B}/x", "data.root", env=env)


def test_paths_expand_env_and_are_relative_to_the_yaml(tmp_path, monkeypatch):
    text = "task: luna-fpr\ndata:\n  root: ${MEDETECT_TEST_DATA:-data}/luna\n  candidates: ${MEDETECT_TEST_C}/c.csv\n"
    path = _write(tmp_path, text)
    monkeypatch.delenv("MEDETECT_TEST_DATA", raising=False)
    monkeypatch.delenv("MEDETECT_TEST_C", raising=False)
    with pytest.raises(ValueError, match=r"exp\.yaml: data\.candidates: environment variable MEDETECT_TEST_C is not set"):
        load_config(path)
    monkeypatch.setenv("MEDETECT_TEST_C", "/abs")
    cfg = load_config(path)
    assert cfg.data.root == str((tmp_path / "data" / "luna").resolve()) and cfg.data.candidates == "/abs/c.csv"
    monkeypatch.setenv("MEDETECT_TEST_DATA", "/elsewhere")
    assert load_config(path).data.root == "/elsewhere/luna"
    # optional paths stay null; cache_dir is resolved like root
    cfg = load_config(_write(tmp_path, "task: luna-detection\ndata:\n  cache_dir: cache\n"))
    assert cfg.data.cache_dir == str((tmp_path / "cache").resolve())
    assert load_config(_write(tmp_path, "task: luna-detection\n")).data.cache_dir is None


# ============================================================================================ LUNA configs


# The recipe the LUNA16 commands trained with before they took YAML configs (the shipped phantom models' recipe):
# the shipped YAMLs and the dataclass defaults must both keep it.
LUNA_RECIPE = dict(spacing=1.5, patch=64, patches_per_volume=8, pos_prob=0.7, epochs=10, steps_per_epoch=0,
                   batch_size=4, lr=1e-3, arch="retinanet", base_width=8, fpn_channels=16, tile=256)
FPR_RECIPE = dict(cube=32, spacing=1.0, scales=[1.0], widths=[16, 32, 64], epochs=10, batch_size=16, lr=1e-3,
                  max_steps_per_epoch=0, seed=0, pos_fraction=0.5, fuse="product", tta=False)


def test_luna_detection_yaml_equals_the_recipe():
    from medetect.luna import detection

    a = LUNA_RECIPE
    cfg = load_config(REPO / "configs" / "luna_detection.yaml")
    assert cfg == LunaDetectionConfig(data=cfg.data)  # the file only restates the defaults (root aside)
    assert (cfg.preprocess.spacing, cfg.data.patch_size, cfg.data.patches_per_volume, cfg.data.pos_prob) == (
        a["spacing"], a["patch"], a["patches_per_volume"], a["pos_prob"])
    t = cfg.train
    assert (t.epochs, t.max_steps_per_epoch, t.batch_size, t.lr) == (
        a["epochs"], a["steps_per_epoch"], a["batch_size"], a["lr"])
    m = cfg.model
    assert (m.arch, m.base_width, m.fpn_channels) == (a["arch"], a["base_width"], a["fpn_channels"])
    assert m == detection.default_detector_config()
    assert cfg.data.cache_dir is None and cfg.data.allow_missing_scans is False and cfg.data.subsets == []
    assert cfg.predict.tile_size == a["tile"]
    assert cfg.preprocess.build() == detection.LunaPreprocess(spacing=1.5)


def test_luna_fpr_yaml_equals_the_recipe():
    a = FPR_RECIPE
    cfg = load_config(REPO / "configs" / "luna_fpr.yaml")
    assert cfg == LunaFPRConfig(data=cfg.data)
    m, t = cfg.model, cfg.train
    assert (m.cube_size, m.spacing_mm, m.scales, m.widths, m.in_channels) == (
        a["cube"], a["spacing"], a["scales"], a["widths"], len(a["scales"]))
    assert (t.epochs, t.batch_size, t.lr, t.max_steps_per_epoch, t.seed) == (
        a["epochs"], a["batch_size"], a["lr"], a["max_steps_per_epoch"], a["seed"])
    assert cfg.data.pos_fraction == a["pos_fraction"]
    assert (cfg.score.fuse, cfg.score.tta) == (a["fuse"], a["tta"])
    from medetect.luna.fpr import FUSION_MODES

    assert LunaFPRConfig.__dataclass_fields__["score"].default_factory.__dataclass_fields__[
        "fuse"].metadata["medetect"]["choices"] == FUSION_MODES


@pytest.fixture(scope="module")
def phantom_luna(tmp_path_factory):
    from medetect.data.phantoms import write_luna16_dataset

    root = tmp_path_factory.mktemp("luna")
    write_luna16_dataset(root / "luna", n_scans=2, seed=5, subsets=2, nodules_per_scan=[1, 1], n_excluded=0,
                         shape=(24, 48, 48), spacing=(2.0, 1.5, 1.5), nodule_diameters_mm=(6.0, 10.0),
                         n_vessel_branches=10)
    return root


def test_train_detector_from_a_config_file(phantom_luna, tmp_path):
    """The YAML route: load_config -> train_detector(None, run_dir, config=cfg) reads folder, subsets, sampling,
    preprocessing, model and training from the config."""
    from medetect.luna.detection import train_detector

    path = phantom_luna / "det.yaml"
    path.write_text("task: luna-detection\ndata:\n  root: luna\n  test_subset: subset1\n  patch_size: 16\n"
                    "  patches_per_volume: 1\npreprocess:\n  spacing: 3.0\n")
    cfg = load_config(path, ["model.base_width=4", "model.fpn_channels=8", "train.epochs=1",
                             "train.max_steps_per_epoch=1", "train.batch_size=1", "train.warmup_iters=1"])
    w = train_detector(None, tmp_path / "run", config=cfg, progress=False)
    assert w.is_file()
    import json

    rc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rc["patch_size"] == 16 and rc["patches_per_volume"] == 1 and rc["preprocess"]["spacing"] == [3.0] * 3
    assert rc["model"]["base_width"] == 4 and rc["train"]["max_steps_per_epoch"] == 1
    assert len(rc["train_uids"]) == 1  # subset1 held out
    assert (tmp_path / "run" / "cache").is_dir()


def test_train_fpr_from_a_config_file(phantom_luna, tmp_path):
    from medetect.luna.fpr import train_fpr

    path = phantom_luna / "fpr.yaml"
    path.write_text("task: luna-fpr\ndata:\n  root: luna\n  candidates: luna/candidates.csv\n  subsets: [subset0]\n"
                    "model:\n  cube_size: 8\n  spacing_mm: 2.0\n  widths: [4, 8]\n  stem_width: 4\n  groups: 2\n"
                    "train:\n  epochs: 1\n  max_steps_per_epoch: 1\n  batch_size: 2\n  warmup_iters: 1\n")
    cfg = load_config(path)
    model, hist = train_fpr(run_dir=tmp_path / "run", config=cfg, progress=False)
    assert model.config == cfg.model and (tmp_path / "run" / "model.safetensors").is_file()
    import json

    rec = json.loads((tmp_path / "run" / "fpr_config.json").read_text())
    assert rec["pos_fraction"] == 0.5 and rec["train"]["batch_size"] == 2 and len(rec["scans"]) == 1
    with pytest.raises(ValueError, match=r"data\.candidates is not set"):
        train_fpr(run_dir=tmp_path / "r2", config=LunaFPRConfig(data=dataclasses.replace(cfg.data, candidates="")))


# ============================================================================================ reference


def test_config_reference_is_up_to_date():
    """docs/config-reference.md is generated: regenerate with `python -m medetect.config > docs/config-reference.md`."""
    doc = REPO / "docs" / "config-reference.md"
    assert doc.is_file(), "docs/config-reference.md is missing"
    assert doc.read_text() == config_reference(), (
        "docs/config-reference.md is stale: run `python -m medetect.config > docs/config-reference.md`")


def test_reference_lists_every_key_with_range_and_doc():
    text = reference(TrainConfig, "train")
    assert "| `train.grad_clip` | number | `10.0` | >= 0 | max global gradient norm; 0 disables clipping |" in text
    assert "| `train.optimizer` | string | `sgd` | one of `sgd`, `adamw` |" in text
    full = config_reference()
    for key in ("data.std", "model.nms_thresh", "preprocess.hu_lo", "predict.tile_size", "score.fuse",
                "data.candidates"):
        assert f"`{key}`" in full


def test_every_config_field_has_a_doc_and_every_number_a_range():
    import dataclasses as dc
    import typing

    from medetect.luna.config import (FPRDataConfig, FPRScoreConfig, LunaDataConfig, LunaPredictConfig,
                                      LunaPreprocessConfig)

    unbounded_ok = {"hu_lo", "hu_hi", "hu_window", "mean"}  # any HU / any mean is legal (cross-field checks aside)
    for cls in (DetectorConfig, TrainConfig, DataConfig, FPRConfig, LunaDataConfig, LunaPreprocessConfig,
                LunaPredictConfig, FPRDataConfig, FPRScoreConfig):
        hints = typing.get_type_hints(cls)
        for f in dc.fields(cls):
            meta = f.metadata.get("medetect")
            assert meta and meta["doc"], f"{cls.__name__}.{f.name} has no doc"
            numeric = any(t in str(hints[f.name]) for t in ("int", "float"))
            if numeric and f.name not in unbounded_ok:
                has_range = any(meta[k] is not None for k in ("gt", "ge", "lt", "le", "choices"))
                assert has_range, f"{cls.__name__}.{f.name} has no range"


def test_from_dict_is_generic():
    cfg = from_dict(TrainConfig, {"epochs": 3, "lr": 1}, "train")
    assert cfg.epochs == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_partial_luna_model_section_keeps_the_luna_defaults():
    """A section only changes the keys it names: the rest keep the section's default object (LUNA's small 3D
    RetinaNet), not the class defaults of DetectorConfig."""
    from medetect.luna.detection import default_detector_config

    cfg = config_from_dict({"task": "luna-detection", "model": {"arch": "faster_rcnn",
                                                                "rpn_negative_sampling": "hard",
                                                                "rpn_objectness_loss": "bce"}})
    assert cfg.model == default_detector_config(arch="faster_rcnn", rpn_negative_sampling="hard",
                                                rpn_objectness_loss="bce")
    cfg = config_from_dict({"task": "luna-detection", "train": {"epochs": 3}, "model": None})  # `model:` empty
    assert cfg.model == default_detector_config()
    assert cfg.train.epochs == 3 and cfg.train.optimizer == "adamw" and cfg.train.warmup_iters == 50


def test_every_task_schema_names_its_task():
    """The registry is the one list of tasks: each task's config schema selects exactly that task, and a config
    with an unknown task is one sentence listing them."""
    from medetect.apps.tasks import TASKS

    for name, task in TASKS.items():
        assert task.name == name
        assert config_from_dict({"task": name}).task == name
    with pytest.raises(ValueError, match="task must be one of"):
        config_from_dict({"task": "segmentation"})
