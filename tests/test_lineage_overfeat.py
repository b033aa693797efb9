"""Lineage steps 1-2 on synthetic images (coloured discs on a light background): one-object crops, the localizer
step (train, record, evaluate, resume) and OverFeat's sliding-window detection, NMS and box merging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medetect.boxes import box_iou
from medetect.lineage.crops import NEG_IOU, object_crops
from medetect.lineage.data import LineageSet
from medetect.lineage.localizer import (LocalizerStepConfig, OverFeat, OverFeatConfig, evaluate_localizer,
                                        load_overfeat, merge_boxes, train_localizer)
from medetect.models.localizer import Localizer, LocalizerConfig

torch.set_num_threads(1)

COLOURS = torch.tensor([[60.0, 60.0, 200.0], [200.0, 60.0, 60.0]])  # class 0 blue, class 1 red


def disc_image(h: int, w: int, discs: list[tuple[float, float, float, int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    """Discs ``(cy, cx, r, label)`` on a background of 230 -> image ``[3, h, w]``, boxes ``[G, 4]``, labels."""
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    img = torch.full((3, h, w), 230.0)
    boxes, labels = [], []
    for cy, cx, r, lab in discs:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[:, inside] = COLOURS[lab][:, None]
        boxes.append([cy - r, cx - r, cy + r, cx + r])
        labels.append(lab)
    return img, torch.tensor(boxes), torch.tensor(labels)


def synthetic_set(n: int = 3, seed: int = 0) -> LineageSet:
    g = torch.Generator().manual_seed(seed)
    images, boxes, labels = [], [], []
    for i in range(n):
        discs = []
        for j in range(3):
            r = float(6 + 10 * torch.rand(1, generator=g))
            cy = float(20 + 80 * torch.rand(1, generator=g))
            cx = 25.0 + 50 * j + float(10 * torch.rand(1, generator=g))
            discs.append((cy, cx, r, (i + j) % 2))
        im, b, lab = disc_image(120, 170, discs)
        images.append(im), boxes.append(b), labels.append(lab)
    return LineageSet(images, boxes, labels, [f"img{i}" for i in range(n)], ["blue", "red"], 1.0, "synthetic")


def test_object_crops_cut_the_object_and_its_box():
    data = synthetic_set()
    crops, targets, wins = object_crops(data, window=32, negatives_per_image=3, seed=1, return_windows=True)
    assert crops.shape == (9 + 9, 3, 32, 32) and len(targets) == 18 and wins.shape == (18, 5)
    k = 0
    for i in range(len(data)):
        g = len(data.boxes[i])
        for j in range(g):  # object crops: the disc's coloured pixels fill the target box
            t = targets[k + j]
            assert int(t["labels"][0]) == int(data.labels[i][j])
            win = wins[k + j]
            side = float(win[3] - win[1])
            longest = float((data.boxes[i][j, 2:] - data.boxes[i][j, :2]).max())
            assert float(win[0]) == i and 1.3 - 1e-4 <= side / longest <= 2.0 + 1e-4
            assert float(win[4] - win[2]) == pytest.approx(side)
            # the target maps back to the image box
            back = t["boxes"][0] * side / 32 + win[1:3].repeat(2)
            torch.testing.assert_close(back, data.boxes[i][j].float(), atol=1e-3, rtol=0)
            colour = COLOURS[int(t["labels"][0])]
            mask = ((crops[k + j] - colour[:, None, None]).abs().amax(0) < 40)  # [32, 32] pixels of the disc
            ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            y0, x0, y1, x1 = t["boxes"][0].tolist()
            assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5
            assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5
        for j in range(g, g + 3):  # background windows: low IoU with every object, no object centre inside
            assert len(targets[k + j]["labels"]) == 0 and targets[k + j]["boxes"].shape == (0, 4)
            win = wins[k + j, 1:]
            assert (box_iou(win[None], data.boxes[i].float()) < NEG_IOU).all()
            c = (data.boxes[i][:, :2] + data.boxes[i][:, 2:]) / 2
            assert not ((c >= win[:2]) & (c < win[2:])).all(1).any()
        k += g + 3
    # deterministic with the seed, different with another
    again, _ = object_crops(data, window=32, negatives_per_image=3, seed=1)
    other, _ = object_crops(data, window=32, negatives_per_image=3, seed=2)
    assert torch.equal(again, crops) and not torch.equal(other, crops)


def test_object_crops_pad_with_zeros_outside_the_image():
    img, boxes, labels = disc_image(60, 60, [(8.0, 8.0, 7.0, 0)])  # a disc in the corner
    data = LineageSet([img], [boxes], [labels], ["corner"], ["blue", "red"], 1.0, "")
    crops, targets = object_crops(data, window=32, context=(2.0, 2.0), jitter=0.0, negatives_per_image=0, seed=0)
    # window side 28 centred on (8, 8): 6 pixels outside at the top-left -> about 32 * 6 / 28 rows of zeros
    assert crops.shape == (1, 3, 32, 32)
    assert crops[0, :, :5, :].abs().max() == 0 and crops[0, :, :, :5].abs().max() == 0
    assert crops[0, :, 27:, 27:].min() > 200  # background beyond the disc (disc: rows, cols < 24)
    torch.testing.assert_close(targets[0]["boxes"][0], torch.tensor([8.0, 8.0, 24.0, 24.0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="context"):
        object_crops(data, window=32, context=(2.0, 1.0))


def _hand_set_localizer(window: int = 32, p_class0: float = 0.9) -> Localizer:
    """Every window: class 0 with probability p_class0, and the box [8, 8, 24, 24] of a 32 window (its centre half)."""
    m = Localizer(LocalizerConfig(ndim=2, in_channels=3, num_classes=2, base_width=8, window=window, hidden=8)).eval()
    with torch.no_grad():
        m.cls.weight.zero_()
        logit = math.log(p_class0 / ((1 - p_class0) / 2))
        m.cls.bias.copy_(torch.tensor([0.0, logit, 0.0]))
        m.box.weight.zero_()
        m.box.bias.copy_(torch.tensor([0.25, 0.25, 0.75, 0.75]).repeat(2))
    return m


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_overfeat_boxes_in_image_coordinates(scale):
    m = _hand_set_localizer()
    cfg = OverFeatConfig(scales=[scale], score_thresh=0.5, nms_thresh=1.0, detections_per_img=1000,
                         pre_nms_top_n=1000)
    method = OverFeat(m, cfg, ["blue", "red"])
    image = torch.full((3, 96, 128), 200.0)
    out = method.detect(image)
    assert method.name == "OverFeat" and out["proposal_seconds"] == 0.0
    # the windows: the scaled image padded by 16 on each side, stride 16, window 32
    h, w = round(96 * scale) + 32, round(128 * scale) + 32
    mh, mw = math.ceil(h / 16) - 1, math.ceil(w / 16) - 1
    assert out["num_proposals"] == mh * mw
    # every window's box is [i*16 - 16 + 8, ..., + 24] in the scaled image, divided by the scale, clipped
    iy, ix = torch.meshgrid(torch.arange(mh), torch.arange(mw), indexing="ij")
    lo = torch.stack([iy.flatten(), ix.flatten()], 1) * 16.0 - 8.0
    want = torch.cat([lo, lo + 16], 1) / scale
    want = torch.stack([want[:, 0].clamp(0, 96), want[:, 1].clamp(0, 128), want[:, 2].clamp(0, 96),
                        want[:, 3].clamp(0, 128)], 1)
    want = want[((want[:, 2:] - want[:, :2]) > 0).all(1)]
    assert (out["labels"] == 0).all() and torch.allclose(out["scores"], torch.tensor(0.9), atol=1e-5)
    got = out["boxes"].to(want.dtype)
    close = (got[:, None] - want[None]).abs().amax(-1) <= 1e-3  # [got, want]: same box to float noise
    assert got.shape == want.shape and bool(close.any(0).all()) and bool(close.any(1).all())


def test_overfeat_nms_and_merge():
    m = _hand_set_localizer()
    image = torch.full((3, 64, 64), 200.0)
    base = dict(scales=[1.0], score_thresh=0.5, detections_per_img=100)
    dense = OverFeat(m, OverFeatConfig(**base, nms_thresh=1.0), ["a", "b"]).detect(image)
    nms = OverFeat(m, OverFeatConfig(**base, nms_thresh=0.0), ["a", "b"]).detect(image)
    # NMS at IoU 0 keeps boxes that do not overlap at all: the 16-pixel boxes on a 16-pixel grid all touch only
    assert len(nms["boxes"]) == len(dense["boxes"])
    merged = OverFeat(m, OverFeatConfig(**base, nms_thresh=0.5, merge=True, merge_iou=0.0), ["a", "b"]).detect(image)
    assert len(merged["boxes"]) == len(dense["boxes"])  # IoU 0 merges nothing (only IoU > 0 joins)
    # merge_boxes by hand: two boxes of class 0 (scores 0.6, 0.2) overlap; a class-1 box at the same place does not
    # join; a far box of class 0 does not join
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 11, 11], [0.0, 0, 10, 10], [50.0, 50, 60, 60]])
    scores = torch.tensor([0.6, 0.2, 0.9, 0.5])
    labels = torch.tensor([0, 0, 1, 0])
    keep = torch.tensor([2, 0, 3])
    out = merge_boxes(boxes, scores, labels, keep, 0.5)
    torch.testing.assert_close(out[0], boxes[2])
    torch.testing.assert_close(out[1], (0.6 * boxes[0] + 0.2 * boxes[1]) / 0.8)
    torch.testing.assert_close(out[2], boxes[3])
    assert merge_boxes(boxes, scores, labels, keep[:0], 0.5).shape == (0, 4)


def test_train_localizer_record_evaluate_resume_and_overfeat(tmp_path: Path):
    train, val = synthetic_set(3, seed=0), synthetic_set(2, seed=1)
    cfg = LocalizerStepConfig(base_width=8, window=32, hidden=16, epochs=1, crops_per_epoch=24, batch_size=8,
                              negatives_per_image=2, warmup_iters=0, val_every=1)
    rec = train_localizer(train, val, cfg, tmp_path, progress=False)
    assert (tmp_path / "localizer.safetensors").is_file() and (tmp_path / "runs" / "localizer").is_dir()
    saved = json.loads((tmp_path / "localizer.json").read_text())
    assert saved["train_seconds"] > 0 and saved["config"]["window"] == 32 and saved["data"]["train"] == "synthetic"
    assert 0 <= saved["val"]["accuracy"] <= 1 and 0 <= saved["val"]["mean_iou"] <= 1
    assert saved["val"]["num_object_crops"] == 6 and rec["val"] == saved["val"]
    ev = evaluate_localizer(tmp_path / "localizer.safetensors", val)
    assert ev["accuracy"] == pytest.approx(saved["val"]["accuracy"], abs=0.02)  # fp16 weights in the file
    # resume: a second epoch continues from the first epoch's checkpoint
    cfg.epochs = 2
    rec2 = train_localizer(train, val, cfg, tmp_path, resume=True, progress=False)
    assert rec2["resumed"] is True
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "localizer").iterdir())
    assert any("2" in n for n in ckpts)
    method = load_overfeat(tmp_path / "localizer.safetensors", OverFeatConfig(scales=[0.5, 1.0], score_thresh=0.0,
                                                                              detections_per_img=7))
    det = method.detect(val.images[0])
    assert det["boxes"].shape == (7, 4) and det["scores"].shape == (7,) and det["labels"].max() <= 1
    assert (det["boxes"][:, 2:] <= torch.tensor([120.0, 170.0])).all() and (det["boxes"] >= 0).all()
    assert det["num_proposals"] > 0
    with pytest.raises(ValueError, match="overfeat.scales"):
        OverFeatConfig(scales=[]).validate()
    with pytest.raises(ValueError, match="localizer.context"):
        LocalizerStepConfig(context=[2.0, 1.0]).validate()
    with pytest.raises(ValueError, match="localizer.window"):
        LocalizerStepConfig(window=40).validate()
