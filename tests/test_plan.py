"""`medetect plan` (issue 13): shape IoU and anchor coverage by hand, anchors that cover the boxes with equal counts
per level (the head is shared), a planned 2D and 3D config that loads and trains one step, the HTML fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medetect.apps.plan import anchor_coverage, choose_anchors_2d, choose_shapes_3d, shape_iou
from medetect.cli import main
from medetect.config import load_config
from medetect.convert import Geometry
from medetect.data.annotations import ImageAnnotation, write_datalist
from medetect.data.image import MedicalImage
from medetect.data.io import write_image


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


def _csv_dataset(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(1)
    rows = ["image,y0,x0,y1,x1,label,split"]
    for i in range(6):
        a = np.full((48, 64, 3), 40, np.uint8)
        for k in range(3):
            y, x, h, w = int(rng.integers(0, 30)), int(rng.integers(0, 40)), int(rng.integers(8, 16)), int(rng.integers(8, 20))
            a[y:y + h, x:x + w] = 200
            rows.append(f"im{i}.png,{y},{x},{y + h},{x + w},{'cell' if k else 'blob'},{'val' if i == 5 else 'train'}")
        Image.fromarray(a).save(root / f"im{i}.png")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    cfg = root / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"format": "csv", "root": ".", "annotations": "boxes.csv"},
                                   "train": {"epochs": 1, "num_workers": 0, "max_steps_per_epoch": 1}}))
    return cfg


def test_plan_2d_writes_a_config_that_trains_and_a_report(tmp_path, capsys):
    cfg = _csv_dataset(tmp_path / "d")
    plan = tmp_path / "plan.yaml"
    assert main(["plan", str(cfg), "--out", str(plan), "--report", str(tmp_path / "rep"), "--memory-gb", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ndim"] == 2 and summary["arch"] == "faster_rcnn" and summary["anchor_coverage"] >= 0.95
    assert "Anchor coverage" in plan.read_text().splitlines()[1]
    c = load_config(plan)
    assert c.model.in_channels == 3 and c.model.class_names == ["blob", "cell"] and c.data.rot90  # colour: microscopy
    assert (tmp_path / "rep" / "index.html").read_text().count("<img") == 3
    assert main(["train", str(plan), "--run-dir", str(tmp_path / "run"), "--threads", "1",
                 "--set", "train.batch_size=2", "--set", "model.base_width=8", "--set", "model.fpn_channels=16"]) == 0


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
    """The issue's goal: anchor coverage >= 0.95 on BCCD and the nodule cubes, planning well under 30 s."""
    monkeypatch.setenv("MEDETECT_DATA", str(shared_data))
    cfg = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert main(["plan", str(cfg), "--out", str(tmp_path / "plan.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["anchor_coverage"] >= 0.95 and summary["planning_seconds"] < 30
