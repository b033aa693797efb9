"""Lineage steps 5-6 (medetect.lineage.detectors): the config section, proposals following the augmentation, and each
of the four rows end to end on a tiny synthetic LineageSet (one epoch, small images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medetect.data import transforms as T
from medetect.lineage.data import LineageSet, normalise
from medetect.lineage.detectors import (NAMES, PREPROCESS, STEPS, DetectorStepConfig, StepDataset, load_detector_step,
                                        train_detector_step)
from medetect.lineage.proposals import ProposalConfig
from medetect.models.io import load_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _has_ximgproc() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "ximgproc")


def _discs(n: int, seed: int, size: int = 64) -> LineageSet:
    """Red and green discs (classes 0 and 1) on a grey background, raw 0..255."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, boxes, labels = [], [], []
    for _ in range(n):
        img = torch.full((3, size, size), 128.0)
        bs, ls = [], []
        for k in range(3):
            r = float(5 + torch.rand(1, generator=g) * 6)
            cy, cx = (r + torch.rand(2, generator=g) * (size - 2 * r)).tolist()
            lab = k % 2
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[:, inside] = torch.tensor([230.0, 40.0, 40.0] if lab == 0 else [40.0, 200.0, 60.0])[:, None]
            bs.append([cy - r, cx - r, cy + r, cx + r])
            ls.append(lab)
        images.append(img)
        boxes.append(torch.tensor(bs))
        labels.append(torch.tensor(ls))
    return LineageSet(images, boxes, labels, [f"disc{seed}_{i}.png" for i in range(n)], ["red", "green"], 1.0,
                      f"synthetic:{seed}")


def _tiny_cfg() -> DetectorStepConfig:
    cfg = DetectorStepConfig()
    m = cfg.model
    m.base_width, m.fpn_channels, m.levels, m.anchor_sizes = 8, 16, [2, 3], [[8], [16]]
    m.roi_hidden, m.roi_batch_size_per_image, m.yolo_stride = 32, 32, 0
    m.rpn_pre_nms_top_n, m.rpn_post_nms_top_n = [200, 100], [100, 50]
    cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup_iters, cfg.train.log_every, cfg.train.val_every = 1, 2, 2, 1, 1
    return cfg


def test_defaults_are_the_bccd_config():
    """The section's defaults are configs/bccd_faster_rcnn.yaml's model (plus the YOLO grid stride), optimiser and
    augmentation; the four rows share the epochs."""
    cfg = DetectorStepConfig()
    cfg.validate()
    ref = yaml.safe_load((ROOT / "configs" / "bccd_faster_rcnn.yaml").read_text())
    model = cfg.model.to_dict()
    for key, value in ref["model"].items():
        assert model[key] == value, key
    for key in ("batch_size", "optimizer", "lr", "weight_decay", "schedule", "grad_clip"):
        assert getattr(cfg.train, key) == ref["train"][key], key
    assert cfg.train.warmup_iters < cfg.train.epochs * 205 // cfg.train.batch_size // 2  # shorter run, shorter warm-up
    for key in ("hflip", "vflip", "random_scale", "intensity"):
        assert getattr(cfg, key) == ref["data"][key], key
    assert cfg.model.yolo_stride == 16 and cfg.fast_rcnn_roi_pool == "max"
    for step in STEPS:
        m = cfg.step_model(step, ["a", "b"])
        assert m.arch == step and m.num_classes == 2 and m.class_names == ["a", "b"]
        assert m.roi_pool == ("max" if step == "fast_rcnn" else "align")
    assert cfg.model.arch == "faster_rcnn"  # step_model never changes the shared section


@pytest.mark.parametrize("change,key", [({"random_scale": [1.2, 0.9]}, "detectors.random_scale"),
                                        ({"fast_rcnn_roi_pool": "avg"}, "detectors.fast_rcnn_roi_pool")])
def test_bad_config_names_the_key(change, key):
    cfg = DetectorStepConfig(**change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate()
    with pytest.raises(ValueError, match="step must be one of"):
        DetectorStepConfig().step_model("rcnn", ["a"])


def test_proposals_follow_the_augmentation():
    """A proposal equal to an object's box stays equal to it through random zoom and flips (one code path), the
    others move by the same map and none is dropped; the image is normalised by the lineage's rule."""
    data = _discs(1, seed=3)
    gt = data.boxes[0]
    props = torch.cat([gt[1:2], torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 30.0, 25.0]])])
    aug = T.Compose([T.RandomScale(range=(0.7, 1.3)), T.RandomFlip(axes=(-1,), p=0.5), T.RandomFlip(axes=(-2,), p=0.5)])
    ds = StepDataset(data, [props], aug)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        s = ds[0]
        h, w = s["image"].shape[1:]
        assert s["boxes"].shape == (3, 4) and s["proposals"].shape == (3, 4)
        torch.testing.assert_close(s["proposals"][0], s["boxes"][1])
        torch.testing.assert_close(s["proposals"][1], torch.tensor([0.0, 0.0, float(h), float(w)]), atol=0.6, rtol=0)
        assert s["labels"].tolist() == data.labels[0].tolist()
        seen.add((h, bool(s["boxes"][1, 1] > 32)))
    assert len(seen) > 2  # zoom and flips did vary
    plain = StepDataset(data, [props])[0]
    torch.testing.assert_close(plain["image"], normalise(data.images[0]))
    torch.testing.assert_close(plain["proposals"], props)
    with pytest.raises(ValueError, match="one tensor per image"):
        StepDataset(data, [props, props])


def _check_outputs(out_dir: Path, step: str, res: dict) -> None:
    weights, record = out_dir / f"{step}.safetensors", out_dir / f"{step}.json"
    assert res["weights"] == str(weights) and weights.is_file() and record.is_file()
    rec = json.loads(record.read_text())
    for key in ("train_seconds", "config", "data", "threads", "torch", "finished_utc"):
        assert key in rec, key
    assert rec["step"] == step and rec["name"] == NAMES[step] and rec["config"]["model"]["arch"] == step
    assert (out_dir / "runs" / step / "best.json").is_file()
    loaded = load_model(weights)
    assert loaded.kind == "detector" and loaded.classes == ["red", "green"]
    assert loaded.preprocess.to_dict() == PREPROCESS.to_dict()
    assert loaded.meta["extra"]["lineage_step"] == step


@pytest.mark.parametrize("step", ["faster_rcnn", "yolo", "retinanet"])
def test_step_end_to_end(tmp_path, step):
    train, val = _discs(4, seed=0), _discs(2, seed=1)
    res = train_detector_step(step, train, val, _tiny_cfg(), tmp_path, progress=False)
    _check_outputs(tmp_path, step, res)
    method = load_detector_step(res["weights"])
    assert method.name == NAMES[step] and method.proposals is None
    image = val.images[0][:, :60, :52]  # a size that needs padding
    det = method.detect(image)
    assert set(det) == {"boxes", "scores", "labels", "num_proposals", "proposal_seconds"}
    assert det["boxes"].shape[1] == 4 and (det["boxes"][:, 2] <= 60).all() and (det["boxes"][:, 3] <= 52).all()
    assert det["proposal_seconds"] == 0.0 and det["num_proposals"] > 0
    if step == "yolo":  # 64 x 64 padded input, the c3 grid of 8 px cells, 2 boxes each
        assert det["num_proposals"] == 8 * 8 * 2
    if step == "retinanet":  # anchors: (16 x 16 + 8 x 8) locations x 3 ratios
        assert det["num_proposals"] == (16 * 16 + 8 * 8) * 3
    with pytest.raises(ValueError, match="resume"):  # the run folder is taken
        train_detector_step(step, train, val, _tiny_cfg(), tmp_path, progress=False)


@pytest.mark.skipif(not _has_ximgproc(), reason="selective search needs cv2.ximgproc (opencv-contrib)")
def test_fast_rcnn_end_to_end_and_resume(tmp_path):
    train, val = _discs(4, seed=0), _discs(2, seed=1)
    props = ProposalConfig(max_proposals=100)
    cache = tmp_path / "ss"
    res = train_detector_step("fast_rcnn", train, val, _tiny_cfg(), tmp_path, progress=False, proposals=props,
                              cache_dir=cache)
    _check_outputs(tmp_path, "fast_rcnn", res)
    assert len(list(cache.glob("*.npz"))) == 6  # train and val images, cached once
    assert load_model(res["weights"]).model.heads.roi_pool.mode == "max"
    method = load_detector_step(res["weights"])
    assert method.name == "Fast R-CNN" and method.proposals == props  # the settings it was trained with
    det = method.detect(val.images[0])
    assert 0 < det["num_proposals"] <= 100 and det["proposal_seconds"] > 0
    assert det["boxes"].shape[1] == 4
    # resume of a finished run: nothing left to train, the files are written again
    again = train_detector_step("fast_rcnn", train, val, _tiny_cfg(), tmp_path, progress=False, proposals=props,
                                cache_dir=cache, resume=True)
    assert json.loads(Path(again["record"]).read_text())["resumed"] is True
    assert again["best_epoch"] == res["best_epoch"] == 1


def test_load_refuses_other_models(tmp_path):
    from medetect.models.detector import DetectorConfig, build_detector
    from medetect.models.io import Preprocess, save_model

    m = build_detector(DetectorConfig(arch="faster_rcnn", base_width=8, fpn_channels=16))
    path = save_model(m, tmp_path / "m.safetensors", kind="detector", preprocess=Preprocess(mean=[0.4]), classes=["a"])
    with pytest.raises(ValueError, match="lineage normalises"):
        load_detector_step(path)
