"""Fast R-CNN (detector arch ``fast_rcnn``): the RoI heads on proposals given with the images, RoI max pooling or
RoIAlign (``model.roi_pool``), the ground truth joining the proposals in training, 2D and 3D, the model file."""

from __future__ import annotations

import pytest
import torch

from medetect.layers.roi_align import roi_align, roi_pool
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, load_model, save_model
from medetect.models.roi_heads import MultiLevelRoIAlign

torch.set_num_threads(1)


def _cfg(ndim: int = 2, **kw) -> DetectorConfig:
    base = dict(arch="fast_rcnn", ndim=ndim, in_channels=1, num_classes=2, base_width=8, fpn_channels=16, levels=[2, 3],
                anchor_sizes=[[8], [16]], roi_hidden=32, roi_batch_size_per_image=64, score_thresh=0.0)
    base.update(kw)
    return DetectorConfig(**base)


def _scene(ndim: int):
    x = torch.zeros((2, 1) + (32,) * ndim)
    boxes = torch.tensor([[4.0] * ndim + [12.0] * ndim, [16.0] * ndim + [28.0] * ndim])
    for b, v in zip(boxes.long(), (1.0, 2.0)):
        x[(slice(None), 0) + tuple(slice(int(b[a]), int(b[a + ndim])) for a in range(ndim))] = v
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1])}, {"boxes": boxes[1:], "labels": torch.tensor([1])}]
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(40, ndim, generator=g) * 24
    props = torch.cat([lo, lo + 3 + torch.rand(40, ndim, generator=g) * 8], 1).clamp(max=32)
    proposals = [torch.cat([boxes + 1, props]), props[:20]]
    return x, targets, proposals


def test_no_rpn_and_pooling_option():
    m = build_detector(_cfg())
    assert m.rpn is None and m.heads.roi_pool.mode == "align"
    assert build_detector(_cfg(roi_pool="max")).heads.roi_pool.mode == "max"
    assert DetectorConfig().roi_pool == "align"  # faster_rcnn's default pooling is unchanged
    assert build_detector(_cfg(arch="faster_rcnn")).heads.roi_pool.mode == "align"
    with pytest.raises(ValueError, match="model.roi_pool"):
        build_detector(_cfg(roi_pool="avg"))
    with pytest.raises(ValueError, match="mode"):
        MultiLevelRoIAlign(strides=[4], output_size=7, mode="avg")


def test_proposals_required_and_checked():
    m = build_detector(_cfg()).eval()
    x, targets, props = _scene(2)
    with pytest.raises(ValueError, match="needs proposals"):
        m(x)
    with pytest.raises(ValueError, match="needs proposals"):
        m(x, targets)  # targets without "proposals"
    with pytest.raises(ValueError, match="one tensor per image"):
        m(x, proposals=props[:1])
    with pytest.raises(ValueError, match=r"proposals\[1\] must have shape \[N, 4\]"):
        m(x, proposals=[props[0], torch.zeros(3, 6)])
    with pytest.raises(ValueError, match="fast_rcnn only"):
        build_detector(_cfg(arch="faster_rcnn")).eval()(x, proposals=props)


def test_proposals_argument_or_targets_give_the_same_losses():
    torch.manual_seed(0)
    m = build_detector(_cfg()).train()
    x, targets, props = _scene(2)
    torch.manual_seed(1)
    a = m(x, targets, proposals=props)
    torch.manual_seed(1)
    b = m(x, [{**t, "proposals": p} for t, p in zip(targets, props)])
    assert set(a["losses"]) == {"roi_classifier", "roi_box"}
    for k in a["losses"]:
        assert torch.equal(a["losses"][k], b["losses"][k])
    assert all(torch.equal(p, q) for p, q in zip(a["proposals"], props))


def test_ground_truth_joins_the_proposals_in_training():
    """Proposals that all miss the objects still give foreground RoIs (a box loss): the ground truth is one."""
    torch.manual_seed(0)
    m = build_detector(_cfg()).train()
    x, targets, _ = _scene(2)
    far = [torch.tensor([[0.0, 20.0, 3.0, 31.0]]), torch.zeros(0, 4)]  # IoU 0 with every object; image 1 has none
    losses = m(x, targets, proposals=far)["losses"]
    assert float(losses["roi_box"].detach()) > 0 and torch.isfinite(losses["roi_classifier"])


@pytest.mark.parametrize("pool", ["align", "max"])
def test_multilevel_pooling_matches_the_op(pool):
    """One level: the module is the op (RoI max pooling on the paper's inclusive pixel ends, hi - 1)."""
    f = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0.0, 0.0, 0.0, 16.0, 16.0], [0.0, 4.0, 8.0, 30.0, 20.0]])
    out = MultiLevelRoIAlign(strides=[4], output_size=2, mode=pool)([f], rois)
    if pool == "max":
        ref = roi_pool(f, torch.cat([rois[:, :3], rois[:, 3:] - 1], 1), 2, spatial_scale=0.25)
    else:
        ref = roi_align(f, rois, 2, spatial_scale=0.25, sampling_ratio=2)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("ndim,pool", [(2, "max"), (2, "align"), (3, "max")])
def test_overfit_loss_decreases(ndim, pool):
    torch.manual_seed(0)
    m = build_detector(_cfg(ndim, roi_pool=pool)).train()
    x, targets, props = _scene(ndim)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        loss = sum(m(x, targets, proposals=props)["losses"].values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    m.eval()
    with torch.no_grad():
        dets = m(x, proposals=props)["detections"]
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 2 * ndim and len(dets[0]["boxes"]) > 0


def test_empty_proposals_give_no_detections():
    m = build_detector(_cfg()).eval()
    x, _, props = _scene(2)
    with torch.no_grad():
        dets = m(x, proposals=[props[0], torch.zeros(0, 4)])["detections"]
    assert dets[1]["boxes"].shape == (0, 4) and len(dets[0]["boxes"]) > 0


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_detector(_cfg(roi_pool="max")).eval()
    x, _, props = _scene(2)
    path = save_model(model, tmp_path / "fast.safetensors", kind="detector", preprocess=Preprocess(),
                      classes=["a", "b"], fp16=False)
    loaded = load_model(path)
    assert loaded.model.config.arch == "fast_rcnn" and loaded.model.heads.roi_pool.mode == "max"
    assert loaded.model.rpn is None
    with torch.no_grad():
        a, b = model(x, proposals=props)["detections"], loaded.model(x, proposals=props)["detections"]
    for da, db in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(da[key], db[key])
