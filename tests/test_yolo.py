"""YOLO v1 grid head (medetect.models.yolo) as the detector arch ``yolo``: shapes, the responsible-predictor rule by
hand, the loss against a slow loop over cells, a tiny overfit, 2D and 3D, and the model file round trip."""

from __future__ import annotations

import math

import pytest
import torch

from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, load_model, save_model
from medetect.models.yolo import YoloHead

torch.set_num_threads(1)


def _cfg(ndim: int = 2, **kw) -> DetectorConfig:
    base = dict(arch="yolo", ndim=ndim, in_channels=1, num_classes=2, base_width=8, fpn_channels=16, levels=[2, 3],
                anchor_sizes=[[8], [16]], score_thresh=0.0)
    base.update(kw)
    return DetectorConfig(**base)


def _scene(ndim: int, size: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """Two bright cubes / squares on a dark background, one per class."""
    x = torch.zeros((1, 1) + (size,) * ndim)
    boxes = torch.tensor([[4.0] * ndim + [12.0] * ndim, [16.0] * ndim + [28.0] * ndim])
    for b, v in zip(boxes.long(), (1.0, 2.0)):
        x[(0, 0) + tuple(slice(int(b[a]), int(b[a + ndim])) for a in range(ndim))] = v
    return x, [{"boxes": boxes, "labels": torch.tensor([0, 1])}]


@pytest.mark.parametrize("ndim", [2, 3])
def test_shapes_and_detections(ndim):
    torch.manual_seed(0)
    model = build_detector(_cfg(ndim, yolo_boxes_per_cell=3)).eval()
    head = model.heads
    assert isinstance(head, YoloHead) and head.stride == (8,) * ndim  # the deepest level (c3: stride 8)
    x = torch.randn((2, 1) + (32,) * ndim)
    out = head.outputs(model.features(x), x.shape[2:])
    m = 4**ndim
    assert out["grid"] == (4,) * ndim
    assert out["offset"].shape == out["sqrt_size"].shape == (2, m, 3, ndim)
    assert out["conf"].shape == (2, m, 3) and out["probs"].shape == (2, m, 2)
    assert out["boxes"].shape == (2, m, 3, 2 * ndim)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(2, m))
    assert head.num_boxes(x.shape[2:]) == m * 3
    with torch.no_grad():
        dets = model(x)["detections"]
    assert len(dets) == 2
    for det in dets:
        assert det["boxes"].shape[1] == 2 * ndim and len(det["boxes"]) <= 100
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 32).all()
        assert det["labels"].max() < 2 and (det["scores"] > 0).all()


def test_stride_choice_and_bad_stride():
    assert build_detector(_cfg(yolo_stride=4)).heads.stride == (4, 4)
    assert build_detector(_cfg(yolo_stride=4)).heads.level == 0
    with pytest.raises(ValueError, match="model.yolo_stride"):
        build_detector(_cfg(yolo_stride=16))
    with pytest.raises(ValueError, match="model.yolo_boxes_per_cell"):
        build_detector(_cfg(yolo_boxes_per_cell=0))


def test_responsible_predictor_by_hand():
    """Grid 4 x 4 of 8 px cells (input 32 x 32), B = 2. The object (2, 10, 10, 14) has its centre (6, 12) in cell
    (0, 1) = flat 1; predictor 1 there overlaps it exactly, predictor 0 not at all -> predictor 1 is responsible.
    A second object centred in the same cell is listed after it: the cell keeps the first."""
    head = YoloHead(in_channels=4, num_classes=3, ndim=2, level=0, stride=8, boxes_per_cell=2)
    boxes = torch.zeros(2, 16, 2, 4)
    boxes[..., 2:] = 1.0  # every predicted box (0, 0, 1, 1)
    boxes[0, 1, 1] = torch.tensor([2.0, 10.0, 10.0, 14.0])
    boxes[1, 5, 0] = torch.tensor([8.0, 8.0, 16.0, 16.0])  # image 1, cell (1, 1): predictor 0 overlaps best
    boxes[1, 5, 1] = torch.tensor([20.0, 20.0, 24.0, 24.0])
    out = {"boxes": boxes, "conf": torch.zeros(2, 16, 2), "grid": (4, 4)}
    targets = [{"boxes": torch.tensor([[2.0, 10.0, 10.0, 14.0], [3.0, 9.0, 9.0, 15.0]]), "labels": torch.tensor([2, 0])},
               {"boxes": torch.tensor([[8.0, 8.0, 14.0, 16.0]]), "labels": torch.tensor([1])}]
    a = head.assign(out, targets, (32, 32))
    assert a["image"].tolist() == [0, 1] and a["cell"].tolist() == [1, 5] and a["box"].tolist() == [1, 0]
    assert a["gt"].tolist() == [0, 2] and a["labels"].tolist() == [2, 1]
    torch.testing.assert_close(a["iou"], torch.tensor([1.0, 48.0 / 64.0]))
    torch.testing.assert_close(a["offset"], torch.tensor([[0.75, 0.5], [0.375, 0.5]]))
    torch.testing.assert_close(a["sqrt_size"], torch.tensor([[math.sqrt(8 / 32), math.sqrt(4 / 32)],
                                                             [math.sqrt(6 / 32), math.sqrt(8 / 32)]]))


def _loss_by_loop(head: YoloHead, out: dict, targets: list[dict], shape) -> float:
    """The paper's Eq. 3 written with loops over images, cells and boxes (slow, obviously right)."""
    d, k, nb = head.ndim, head.num_classes, head.boxes_per_cell
    n, m = out["conf"].shape[:2]
    grid = out["grid"]
    total = 0.0
    for i in range(n):
        owner = {}
        for g, (box, lab) in enumerate(zip(targets[i]["boxes"].tolist(), targets[i]["labels"].tolist())):
            cell_nd = [min(max(int(((box[a] + box[a + d]) / 2) // head.stride[a]), 0), grid[a] - 1) for a in range(d)]
            flat = 0
            for a in range(d):
                flat = flat * grid[a] + cell_nd[a]
            owner.setdefault(flat, (box, lab, cell_nd))
        for c in range(m):
            resp = -1
            if c in owner:
                box, lab, cell_nd = owner[c]
                ious = []
                for b in range(nb):
                    p = out["boxes"][i, c, b].tolist()
                    inter = math.prod(max(0.0, min(p[a + d], box[a + d]) - max(p[a], box[a])) for a in range(d))
                    union = math.prod(p[a + d] - p[a] for a in range(d)) + math.prod(box[a + d] - box[a] for a in range(d)) - inter
                    ious.append(inter / union)
                resp = max(range(nb), key=lambda b: (ious[b], -b))
                for a in range(d):
                    t_off = (box[a] + box[a + d]) / 2 / head.stride[a] - cell_nd[a]
                    t_size = math.sqrt((box[a + d] - box[a]) / shape[a])
                    total += head.lambda_coord * ((float(out["offset"][i, c, resp, a]) - t_off) ** 2
                                                  + (float(out["sqrt_size"][i, c, resp, a]) - t_size) ** 2)
                total += (float(out["conf"][i, c, resp]) - ious[resp]) ** 2
                total += sum((float(out["probs"][i, c, j]) - (1.0 if j == lab else 0.0)) ** 2 for j in range(k))
            for b in range(nb):
                if b != resp:
                    total += head.lambda_noobj * float(out["conf"][i, c, b]) ** 2
    return total / n


@pytest.mark.parametrize("ndim", [2, 3])
def test_loss_matches_loop_reference(ndim):
    torch.manual_seed(1)
    model = build_detector(_cfg(ndim, yolo_boxes_per_cell=2, num_classes=3))
    with torch.no_grad():  # a livelier head than the 0.01 init, so every term counts
        model.heads.pred.weight.normal_(std=0.5)
    head = model.heads
    x = torch.randn((2, 1) + (32,) * ndim)
    lo = torch.rand(6, ndim) * 20
    boxes = torch.cat([lo, lo + 2 + torch.rand(6, ndim) * 10], 1)
    targets = [{"boxes": boxes[:4], "labels": torch.tensor([0, 1, 2, 0])},
               {"boxes": boxes[4:], "labels": torch.tensor([2, 1])}]
    targets[0]["boxes"][1] = targets[0]["boxes"][0] + 0.5  # two centres in one cell: the first keeps it
    with torch.no_grad():
        feats = model.features(x)
        out = head.outputs(feats, x.shape[2:])
        losses = head._losses(out, x.shape[2:], targets)
    assert set(losses) == {"yolo_coord", "yolo_obj", "yolo_noobj", "yolo_class"}
    ref = _loss_by_loop(head, out, targets, x.shape[2:])
    assert float(sum(losses.values())) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_overfit_loss_decreases(ndim):
    torch.manual_seed(0)
    model = build_detector(_cfg(ndim)).train()
    x, t = _scene(ndim)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        losses = model(x, t)["losses"]
        loss = sum(losses.values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    assert all(torch.isfinite(v) for v in losses.values())


def test_no_objects_gives_only_noobj_loss():
    model = build_detector(_cfg()).train()
    x = torch.randn(1, 1, 32, 32)
    losses = model(x, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])["losses"]
    assert float(losses["yolo_noobj"]) > 0
    assert float(losses["yolo_coord"]) == float(losses["yolo_obj"]) == float(losses["yolo_class"]) == 0


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_detector(_cfg(yolo_boxes_per_cell=3, yolo_lambda_noobj=0.25)).eval()
    x = torch.randn(1, 1, 32, 32)
    path = save_model(model, tmp_path / "yolo.safetensors", kind="detector", preprocess=Preprocess(), classes=["a", "b"],
                      fp16=False)
    loaded = load_model(path)
    assert loaded.model.config.arch == "yolo" and loaded.model.heads.boxes_per_cell == 3
    assert loaded.model.heads.lambda_noobj == 0.25
    with torch.no_grad():
        a, b = model(x)["detections"][0], loaded.model(x)["detections"][0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key])
