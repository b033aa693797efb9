"""`medetect plan` (issue 13): shape IoU and anchor coverage by hand, anchors that cover the boxes with equal counts
per level (the head is shared), a planned 2D and 3D config that loads and trains one step, the HTML fingerprint; the
batch (and 2D scale) sized by a measured training step on the LARGEST image, and flips by modality."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medetect.apps import plan as plan_mod
from medetect.apps.plan import anchor_coverage, choose_anchors_2d, choose_shapes_3d, measure_training_step, shape_iou
from medetect.cli import main
from medetect.config import config_from_dict, load_config
from medetect.convert import Geometry
from medetect.data.annotations import ImageAnnotation, write_datalist
from medetect.data.image import MedicalImage
from medetect.data.io import write_image

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_detector_config  # noqa: E402


def test_shape_iou_and_coverage_by_hand():
    boxes = np.array([[10.0, 10.0], [10.0, 20.0]])
    anchors = np.array([[10.0, 10.0]])
    np.testing.assert_allclose(shape_iou(boxes, anchors), [[1.0], [0.5]])  # 100 / (200 + 100 - 100)
    cov, best = anchor_coverage(boxes, anchors, 0.7)
    assert cov == 0.5 and best.tolist() == [1.0, 0.5]


def test_chosen_anchors_cover_the_boxes_with_equal_counts_per_level():
    rng = np.random.default_rng(0)
    side = np.exp(rng.uniform(np.log(8), np.log(150), 400))
    ar = np.exp(rng.uniform(np.log(0.6), np.log(1.7), 400))
    hw = np.stack([side * np.sqrt(ar), side / np.sqrt(ar)], 1)
    levels, sizes, ratios, cov, _ = choose_anchors_2d(hw, 0.7)
    assert cov >= 0.95 and levels == list(range(levels[0], levels[-1] + 1))
    assert len({len(s) for s in sizes}) == 1 and len(sizes) == len(levels)
    shapes = np.exp(rng.normal(np.log([6.0, 7.0, 7.0]), 0.3, (100, 3)))
    lv3, per_level, cov3, _ = choose_shapes_3d(shapes, 0.5)
    assert cov3 >= 0.95 and lv3 == [2, 3] and len(per_level[0]) == len(per_level[1])


def _csv_dataset(root: Path, large: tuple[int, int] | None = None, grey: bool = False) -> Path:
    """Six 48 x 64 images with three boxes each (five train, one val); ``large`` adds one training image of that
    size: a folder of mixed sizes whose median is the small one."""
    root.mkdir()
    rng = np.random.default_rng(1)
    rows = ["image,y0,x0,y1,x1,label,split"]
    sizes = [(48, 64)] * 6 + ([large] if large else [])
    for i, (hh, ww) in enumerate(sizes):
        a = np.full((hh, ww, 3), 40, np.uint8)
        for k in range(3):
            y, x, h, w = int(rng.integers(0, 30)), int(rng.integers(0, 40)), int(rng.integers(8, 16)), int(rng.integers(8, 20))
            a[y:y + h, x:x + w] = 200
            rows.append(f"im{i}.png,{y},{x},{y + h},{x + w},{'cell' if k else 'blob'},{'val' if i == 5 else 'train'}")
        Image.fromarray(a[..., 0] if grey else a).save(root / f"im{i}.png")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    cfg = root / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"format": "csv", "root": ".", "annotations": "boxes.csv"},
                                   "train": {"epochs": 1, "num_workers": 0, "max_steps_per_epoch": 1}}))
    return cfg


def test_plan_2d_mixed_sizes_measures_the_largest_image_and_trains(tmp_path, capsys):
    """The batch is sized by a MEASURED step on the largest image (160 x 200 here, among 48 x 64 ones), not the
    median, and the measured memory is what the config comment and the report state."""
    cfg = _csv_dataset(tmp_path / "d", large=(160, 200))
    plan = tmp_path / "plan.yaml"
    assert main(["plan", str(cfg), "--out", str(plan), "--report", str(tmp_path / "rep"), "--memory-gb", "0.15"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ndim"] == 2 and summary["arch"] == "faster_rcnn" and summary["anchor_coverage"] >= 0.95
    assert summary["median_shape"] == [48, 64] and summary["max_shape"] == [160, 200] and summary["scale"] == 1.0
    # 200 px x zoom 1.15 -> 230, both axes under quarter turns, padded to 32: 256 x 256, the whole planned batch
    assert summary["step_input_shape"] == [summary["batch_size"], 3, 256, 256] and summary["step_device"] == "cpu"
    assert 0 < summary["step_memory_gb"] <= 0.8 * 0.15 and summary["step_boxes_per_image"] == 3
    text = plan.read_text()
    assert "Anchor coverage" in text.splitlines()[1]
    measured = re.search(r"MEASURED ([0-9.]+) GB peak on cpu", text)  # the same measurement, printed to 2 decimals
    assert measured and float(measured.group(1)) == pytest.approx(summary["step_memory_gb"], abs=0.0051)
    assert "[48, 64], largest [160, 200]" in text
    c = load_config(plan)
    assert c.train.batch_size == summary["batch_size"] and c.data.scale == 1.0
    assert c.model.in_channels == 3 and c.model.class_names == ["blob", "cell"]
    assert c.data.hflip and c.data.vflip and c.data.rot90  # unknown modality: no canonical orientation assumed
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("<img") == 3 and f"{summary['step_memory_gb']:.3f} GB peak on cpu" in page
    assert main(["train", str(plan), "--run-dir", str(tmp_path / "run"), "--threads", "1",
                 "--set", "train.batch_size=2", "--set", "model.base_width=8", "--set", "model.fpn_channels=16"]) == 0


def _tiny_experiment(**model) -> object:
    m = dataclasses.asdict(tiny_detector_config(**model))
    return config_from_dict({"model": m, "train": {"optimizer": "adamw"}, "data": {"mean": [0.5], "std": [0.25]}})


def test_measure_training_step_is_a_real_step_that_grows_with_the_input():
    cfg = _tiny_experiment()
    sizes = np.array([[6.0, 8.0], [12.0, 10.0]])
    measure_training_step(cfg, [1, 1, 32, 32], sizes, 1)  # warm-up: first-step set-up stays with the process
    state = torch.get_rng_state()
    small = measure_training_step(cfg, [1, 1, 64, 64], sizes, 4)
    big = measure_training_step(cfg, [4, 1, 128, 128], sizes, 4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
    assert small["batch_shape"] == [1, 1, 64, 64] and small["device"] == "cpu" and small["seconds"] > 0
    assert 0 < small["peak_bytes"] < big["peak_bytes"]
    # 16x the input voxels: the activations dominate, at least a few times the memory
    assert big["peak_bytes"] > 3 * small["peak_bytes"]


def _fake_step(fixed: float, per_voxel: float, calls: list, curve: float = 0.0, alone: float = 0.0):
    """A stand-in for measure_training_step: peak = fixed + per_voxel * B * V (+ ``curve`` * (B * V)^2 / 1e6, + ``alone``
    * V: what one image needs while it is processed by itself) for ``B`` inputs of ``V`` voxels."""

    def fake(cfg, shape, box_sizes, boxes_per_image, *, device="cpu", seed=0):
        v = float(np.prod(shape[0:1] + shape[2:]))
        calls.append(list(shape))
        peak = fixed + per_voxel * v + curve * v * v / 1e6 + alone * float(np.prod(shape[2:]))
        return {"peak_bytes": int(peak), "seconds": 0.0, "device": device, "batch_shape": list(shape),
                "boxes_per_image": boxes_per_image}

    return fake


def _cfg_at(zoom=1.0, rot90=False, c=1):
    return lambda s: SimpleNamespace(model=SimpleNamespace(in_channels=c),
                                     data=SimpleNamespace(random_scale=[1.0, zoom], rot90=rot90))


def test_fit_memory_sizes_the_batch_by_the_largest_image(monkeypatch):
    calls: list = []
    monkeypatch.setattr(plan_mod, "measure_training_step", _fake_step(100e6, 1000.0, calls))
    shapes = np.array([[48, 64]] * 9 + [[400, 300]])
    sizes = np.array([[10.0, 12.0]])
    fit = plan_mod._fit_memory(_cfg_at(), shapes, sizes, 5, 1.0, 800e6, "cpu", 2)
    # the largest image pads to 416 x 320: 133 MB each above the 100 MB fixed part -> 5 fit in 800 MB (median: 16)
    assert fit["batch"] == 5 and fit["scale"] == 1.0 and fit["step"]["batch_shape"] == [5, 1, 416, 320]
    assert fit["step"]["peak_bytes"] <= 800e6 and not fit["notes"]
    assert max(float(np.prod(s[:1] + s[2:])) for s in calls) <= 5 * 416 * 320  # nothing larger than the plan ran
    # memory growing faster than the probes predict: the measured step is over, the batch goes down until it fits
    calls.clear()
    monkeypatch.setattr(plan_mod, "measure_training_step", _fake_step(100e6, 1000.0, calls, curve=300.0))
    fit = plan_mod._fit_memory(_cfg_at(), shapes, sizes, 5, 1.0, 800e6, "cpu", 2)
    assert fit["batch"] < 5 and fit["step"]["peak_bytes"] <= 800e6 and fit["step"]["batch_shape"][2:] == [416, 320]
    # one image alone needs much more than its share of a batch (matching runs image by image): the probes of two
    # sizes see it, and the batch is not sized as if every image needed it
    calls.clear()
    monkeypatch.setattr(plan_mod, "measure_training_step", _fake_step(100e6, 200.0, calls, alone=3000.0))
    fit = plan_mod._fit_memory(_cfg_at(), shapes, sizes, 5, 1.0, 800e6, "cpu", 2)
    # one: 100 MB + 3200 B x 133,120 voxels = 526 MB; each further image 26.6 MB -> 1 + 10 images
    assert fit["batch"] == 11 and fit["step"]["peak_bytes"] <= 800e6 and not fit["notes"]


def test_fit_memory_lowers_the_2d_scale_when_one_image_does_not_fit_and_refuses_3d(monkeypatch):
    calls: list = []
    monkeypatch.setattr(plan_mod, "measure_training_step", _fake_step(100e6, 1000.0, calls))
    shapes = np.array([[48, 64], [1040, 1388]])
    fit = plan_mod._fit_memory(_cfg_at(zoom=1.15, rot90=True), shapes, np.array([[10.0, 12.0]]), 5, 1.0, 400e6,
                               "cpu", 2)
    # 1388 x 1.15 -> 1600 x 1600 at scale 1: 2.66 GB for one image; the scale goes down until one fits
    assert fit["scale"] < 1.0 and fit["batch"] >= 1 and fit["step"]["peak_bytes"] <= 400e6
    assert fit["notes"] and "scale 1 ->" in fit["notes"][0]
    assert all(s[2:] != [1600, 1600] for s in calls)  # the input predicted not to fit was never run
    vol = np.array([[64, 128, 128]])
    calls.clear()
    with pytest.raises(ValueError, match=r"largest input \[1, 1, 64, 128, 128\] is predicted to need 1\.07 GB.*--memory-gb"):
        plan_mod._fit_memory(_cfg_at(), vol, np.array([[5.0, 6.0, 6.0]]), 2, 1.0, 150e6, "cpu", 3)
    assert all(s[2:] != [64, 128, 128] for s in calls)  # refused from the probes, not by running it
    fit3 = plan_mod._fit_memory(_cfg_at(), vol, np.array([[5.0, 6.0, 6.0]]), 2, 1.0, 2500e6, "cpu", 3)
    assert fit3["scale"] == 1.0 and fit3["batch"] == 2 and fit3["step"]["batch_shape"] == [2, 1, 64, 128, 128]


@pytest.mark.parametrize("modality, c, flips", [
    ("microscopy", 1, (True, True, True)), ("microscopy", 3, (True, True, True)), ("", 1, (True, True, True)),
    ("xray", 1, (False, False, False)), ("mammography", 1, (True, False, False)),
])
def test_flips_follow_the_modality(modality, c, flips):
    aug = plan_mod._augmentation(2, c, modality)
    assert (aug["hflip"], aug["vflip"], aug["rot90"]) == flips
    assert plan_mod._augmentation(3, 1, modality or "ct")["rot90"] is False


def test_modality_from_the_data_format_and_bad_modality():
    data = SimpleNamespace(format="dsb2018", dataset="voc")
    assert plan_mod._modality("", data, 2) == "microscopy"
    assert plan_mod._modality("xray", data, 2) == "xray"  # stated beats implied
    assert plan_mod._modality("", SimpleNamespace(format="", dataset="bccd"), 2) == "microscopy"
    assert plan_mod._modality("", SimpleNamespace(format="csv", dataset="voc"), 2) == ""
    with pytest.raises(ValueError, match="--modality must be one of"):
        plan_mod._modality("ultrasound", data, 2)


def test_plan_greyscale_microscopy_keeps_every_flip(tmp_path, capsys):
    """A greyscale folder planned as microscopy flips both ways and turns (the old rule took grey for a radiograph);
    ``--modality xray`` turns the flips off."""
    cfg = _csv_dataset(tmp_path / "d", grey=True)
    for modality, on in (("microscopy", True), ("xray", False)):
        plan = tmp_path / f"{modality}.yaml"
        assert main(["plan", str(cfg), "--out", str(plan), "--modality", modality, "--memory-gb", "0.1"]) == 0
        assert json.loads(capsys.readouterr().out)["modality"] == modality
        c = load_config(plan)
        assert c.model.in_channels == 1 and (c.data.hflip, c.data.vflip, c.data.rot90) == (on, on, on)


def test_plan_3d_datalist(tmp_path, capsys):
    geo = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (tmp_path / "v").mkdir()
    recs = []
    for i in range(3):
        a = np.full((1, 16, 20, 20), -800, np.int16)
        a[0, 4:10, 5:12, 6:12] = 40
        write_image(MedicalImage(a, geo), tmp_path / "v" / f"v{i}.mha")
        recs.append(ImageAnnotation(f"v{i}.mha", np.array([[4.0, 5, 6, 10, 12, 12]]), ["nodule"], meta={"geometry": geo}))
    write_datalist({"training": recs}, tmp_path / "dl.json", classes=["nodule"])
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"format": "datalist", "root": "v", "annotations": "dl.json",
                                            "box_mode": "xyzxyz", "classes": ["nodule"], "train_split": "training",
                                            "val_split": ""}}))
    assert main(["plan", str(cfg), "--out", str(tmp_path / "plan.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ndim"] == 3 and summary["arch"] == "retinanet" and summary["anchor_coverage"] == 1.0
    c = load_config(tmp_path / "plan.yaml")
    assert c.model.ndim == 3 and c.data.max_value == 1.0 and c.data.mean == [pytest.approx(40.0)]  # CT: fg window


@pytest.mark.parametrize("name", ["bccd_faster_rcnn", "luna16_patches_datalist"])
def test_plan_covers_the_shared_datasets(shared_data, tmp_path, monkeypatch, capsys, name):
    """Anchor coverage >= 0.95 on BCCD and the nodule cubes. (How long planning takes is reported in the summary and
    measured on the results page, not asserted in a unit test.)"""
    monkeypatch.setenv("MEDETECT_DATA", str(shared_data))
    cfg = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert main(["plan", str(cfg), "--out", str(tmp_path / "plan.yaml"), "--memory-gb", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["anchor_coverage"] >= 0.95
    assert 0 <= summary["measure_seconds"] <= summary["planning_seconds"]
    assert 0 < summary["step_memory_gb"] <= 0.8
