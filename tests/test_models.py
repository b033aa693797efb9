"""Tests for the detectors (medetect.models): backbones, build_detector, losses, detections, overfitting, bad input,
and the anchor order shared by AnchorGenerator and the heads.

Everything is tiny (base_width 8, fpn_channels 16, roi_hidden 32, 64^2 images / 32^3 volumes) so the whole file runs
in well under a minute on two shared CPU cores. Dimension-generic code is tested in 2D and 3D.
"""

from __future__ import annotations

import math

import pytest
import torch

from medetect.anchors import AnchorGenerator
from medetect.backbones.resnet import ResNet
from medetect.backbones.vgg import VGG16
from medetect.boxes import box_iou
from medetect.models.detector import BACKBONES, DetectorConfig, build_detector
from medetect.models.retinanet import RetinaHead
from medetect.models.rpn import flatten_head_outputs

torch.set_num_threads(1)

FRCNN_LOSSES = {"rpn_objectness", "rpn_box", "roi_classifier", "roi_box"}
RETINA_LOSSES = {"classification", "box_regression"}
SIZE = {2: 64, 3: 32}  # image side per spatial dimensionality


def tiny_config(arch: str = "faster_rcnn", d: int = 2, **kw) -> DetectorConfig:
    base = dict(
        arch=arch, ndim=d, in_channels=1, num_classes=2, backbone="resnet18", base_width=8, fpn_channels=16, roi_hidden=32,
        roi_output_size=4 if d == 3 else 7, levels=[2, 3], anchor_sizes=[[16], [32]] if d == 2 else [[10], [20]],
        aspect_ratios=[1.0], rpn_pre_nms_top_n=[200, 100], rpn_post_nms_top_n=[100, 50], rpn_batch_size_per_image=64,
        roi_batch_size_per_image=64,
    )
    base.update(kw)
    return DetectorConfig(**base)


def scene(d: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One dark image with a bright square/cube (label 0) and a dimmer one (label 1): ``[1, 1, *S]`` and targets."""
    s = SIZE[d]
    if d == 2:
        boxes = torch.tensor([[8.0, 10, 24, 26], [36, 34, 56, 54]])
    else:
        boxes = torch.tensor([[4.0, 6, 4, 14, 16, 14], [18, 16, 18, 28, 28, 28]])
    labels = torch.tensor([0, 1])
    img = torch.zeros(1, 1, *(s,) * d)
    for b, lab in zip(boxes, labels):
        img[(0, 0, *[slice(int(b[i]), int(b[i + d])) for i in range(d)])] = 1.0 if lab == 0 else 0.5
    return img, {"boxes": boxes, "labels": labels}


def empty_target(d: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 2 * d), "labels": torch.zeros(0, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ backbones


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("depth,expansion", [(18, 1), (34, 1), (50, 4)])
def test_resnet_feature_shapes(d, depth, expansion):
    s, w = SIZE[d], 8
    net = ResNet(depth=depth, ndim=d, in_channels=2, base_width=w)
    out = net(torch.randn(1, 2, *(s,) * d))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    assert net.strides == [(st,) * d for st in (4, 8, 16, 32)]
    assert net.out_channels == [w * expansion, 2 * w * expansion, 4 * w * expansion, 8 * w * expansion]
    for i, (name, stride, ch) in enumerate(zip(out, net.strides, net.out_channels)):
        assert out[name].shape == (1, ch, *(s // st for st in stride)), name
    assert list(net(torch.randn(1, 2, *(s,) * d), up_to=3)) == ["c2", "c3"]  # deeper stages skipped


def test_resnet_anisotropic_stem_stride():
    net = ResNet(depth=18, ndim=3, in_channels=1, base_width=8, stem_stride=(1, 2, 2))
    out = net(torch.randn(1, 1, 16, 32, 32))
    assert out["c2"].shape == (1, 8, 8, 8, 8)  # the thin axis keeps twice the resolution
    assert out["c5"].shape == (1, 64, 1, 1, 1)
    assert net.strides[0] == (2, 4, 4) and net.strides[3] == (16, 32, 32)
    for name, st in zip(out, net.strides):  # the reported per-axis strides are the real ones
        assert tuple(n // k for n, k in zip((16, 32, 32), st)) == tuple(out[name].shape[2:])


def test_anisotropic_strides_reach_anchors_and_roi_pooling():
    cfg = DetectorConfig(arch="faster_rcnn", ndim=3, in_channels=1, num_classes=1, base_width=8, fpn_channels=8,
                         roi_hidden=8, roi_output_size=2, stem_stride=[1, 2, 2], levels=[2, 3], anchor_sizes=[[8], [16]])
    m = build_detector(cfg)
    assert m.rpn.anchor_generator.strides == [(2, 4, 4), (4, 8, 8)]
    assert m.heads.roi_pool.strides == [(2, 4, 4), (4, 8, 8)]
    anchors = m.rpn.anchor_generator.level_anchors(0, (8, 8, 8))
    centres = (anchors[:, :3] + anchors[:, 3:]) / 2
    assert centres[:, 0].max() == pytest.approx(15.0) and centres[:, 1].max() == pytest.approx(30.0)


@pytest.mark.parametrize("d", [2, 3])
def test_vgg16_feature_shapes(d):
    s, w = SIZE[d], 8
    net = VGG16(ndim=d, in_channels=3, base_width=w)
    out = net(torch.randn(2, 3, *(s,) * d))
    assert list(out) == ["c3", "c4", "c5"]
    assert net.strides == [(st,) * d for st in (4, 8, 16)] and net.out_channels == [4 * w, 8 * w, 8 * w]
    for name, stride, ch in zip(out, net.strides, net.out_channels):
        assert out[name].shape == (2, ch, *(s // st for st in stride)), name


# ------------------------------------------------------------------------------------------------ build + forward


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_every_backbone_builds_a_working_2d_detector(arch, backbone):
    levels = [3, 4, 5] if backbone == "vgg16" else [2, 3, 4, 5]
    cfg = tiny_config(arch, 2, backbone=backbone, in_channels=3, levels=levels, anchor_sizes=[[16 * 2**i] for i in range(len(levels))],
                      aspect_ratios=[0.5, 1.0, 2.0])
    torch.manual_seed(0)
    model = build_detector(cfg)
    img, tgt = scene(2)
    out = model(img.expand(-1, 3, -1, -1).contiguous(), [tgt])
    assert set(out["losses"]) == (FRCNN_LOSSES if arch == "faster_rcnn" else RETINA_LOSSES)
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert out["detections"] == []  # train mode: no detections unless asked


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_train_forward_losses_finite_and_differentiable(arch, d):
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch, d)).train()
    img, tgt = scene(d)
    out = model(img, [tgt])
    losses = out["losses"]
    assert set(losses) == (FRCNN_LOSSES if arch == "faster_rcnn" else RETINA_LOSSES)
    for k, v in losses.items():
        assert v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v), k
        assert v.requires_grad, k
    # The positive anchors/RoIs around the two objects give a non-zero box loss.
    assert float(losses["rpn_box" if arch == "faster_rcnn" else "box_regression"].detach()) > 0
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # Every part of the network receives gradient.
    parts = ["features.body", "features.fpn", "rpn.head", "heads.box_head", "heads.predictor"] if arch == "faster_rcnn" else [
        "features.body", "features.fpn", "heads.head.cls", "heads.head.reg"]
    for part in parts:
        g = [x for n, x in grads.items() if n.startswith(part) and x is not None]
        assert g and any(x.abs().sum() > 0 for x in g), part


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_each_loss_has_its_own_gradient(arch, d):
    """Each loss term is connected to the graph on its own (not a detached constant)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch, d)).train()
    img, tgt = scene(d)
    losses = model(img, [tgt])["losses"]
    for k, v in losses.items():
        model.zero_grad()
        v.backward(retain_graph=True)
        total = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
        assert math.isfinite(total) and total > 0, k


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_eval_forward_with_targets_gives_losses_and_detections(arch, d):
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch, d, score_thresh=0.0)).eval()
    img, tgt = scene(d)
    with torch.no_grad():
        out = model(img, [tgt])
    assert set(out["losses"]) == (FRCNN_LOSSES if arch == "faster_rcnn" else RETINA_LOSSES)
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert len(out["detections"]) == 1 and out["detections"][0]["boxes"].shape[0] > 0
    assert not model.training  # no mode switching happened
    # And train mode with with_detections=True gives both as well.
    model.train()
    out = model(img, [tgt], with_detections=True)
    assert len(out["detections"]) == 1 and set(out["losses"])


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_detection_format(arch, d):
    torch.manual_seed(0)
    k = 3
    cfg = tiny_config(arch, d, num_classes=k, score_thresh=0.0, detections_per_img=20)
    model = build_detector(cfg).eval()
    s = SIZE[d]
    images = torch.randn(2, 1, *(s,) * d)
    with torch.no_grad():
        dets = model(images)["detections"]
    assert len(dets) == 2
    hi = torch.tensor([float(s)] * d)
    for det in dets:
        assert set(det) == {"boxes", "scores", "labels"}
        n = det["boxes"].shape[0]
        assert 0 < n <= cfg.detections_per_img
        assert det["boxes"].shape == (n, 2 * d) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (n,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        b = det["boxes"]
        assert (b >= 0).all() and (b[:, :d] <= hi).all() and (b[:, d:] <= hi).all()
        assert (b[:, d:] > b[:, :d]).all()  # non-empty
        assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted, decreasing
        assert ((det["labels"] >= 0) & (det["labels"] < k)).all()
        # per-class NMS: no two kept boxes of one class overlap above the threshold
        for c in det["labels"].unique():
            bc = b[det["labels"] == c]
            iou = box_iou(bc, bc) - torch.eye(bc.shape[0])
            assert (iou <= cfg.nms_thresh + 1e-6).all()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_images_without_boxes(arch, d):
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch, d)).train()
    img, tgt = scene(d)
    # an all-empty batch: only background terms, box losses exactly zero
    out = model(img, [empty_target(d)])
    losses = out["losses"]
    assert all(torch.isfinite(v) for v in losses.values())
    box_keys = ["rpn_box", "roi_box"] if arch == "faster_rcnn" else ["box_regression"]
    for key in box_keys:
        assert float(losses[key].detach()) == 0.0, key
    cls_key = "rpn_objectness" if arch == "faster_rcnn" else "classification"
    assert float(losses[cls_key].detach()) > 0
    sum(losses.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    # a mixed batch: one image with boxes, one without
    model.zero_grad()
    out = model(torch.cat([img, img]), [tgt, empty_target(d)])
    assert all(torch.isfinite(v) for v in out["losses"].values())
    sum(out["losses"].values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ overfitting


def _overfit(arch: str, d: int, steps: int, lr: float, **kw) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch, d, **kw))
    img, tgt = scene(d)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    first = None
    for _ in range(steps):
        loss = sum(model(img, [tgt])["losses"].values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    model.eval()
    with torch.no_grad():
        return model(img)["detections"][0], tgt


# The 3D Faster R-CNN is the slowest case (RoIAlign in 3D on the CPU): roi_output_size 4 and 100 steps at lr 3e-3
# reach IoU > 0.5 with the right label for both cubes (checked for seeds 0..4), in ~8 s here.
@pytest.mark.parametrize(
    "arch,d,steps,lr",
    [("faster_rcnn", 2, 80, 2e-3), ("retinanet", 2, 60, 2e-3), ("faster_rcnn", 3, 100, 3e-3), ("retinanet", 3, 60, 2e-3)],
)
def test_overfits_one_synthetic_image(arch, d, steps, lr):
    det, tgt = _overfit(arch, d, steps, lr)
    assert det["boxes"].shape[0] > 0
    iou = box_iou(tgt["boxes"], det["boxes"])  # [G, D]
    for g in range(tgt["boxes"].shape[0]):
        right = (iou[g] > 0.5) & (det["labels"] == tgt["labels"][g])
        assert right.any(), f"object {g}: best IoU {float(iou[g].max()):.2f}, labels {det['labels'].tolist()}"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("d", [2, 3])
def test_bad_images_and_targets(d):
    model = build_detector(tiny_config("faster_rcnn", d)).eval()
    s = SIZE[d]
    expected = r"\[B, 1, " + ", ".join(f"S{i + 1}" for i in range(d)) + r"\]"
    with pytest.raises(ValueError, match=expected):
        model(torch.zeros(1, 3, *(s,) * d))  # wrong channel count
    with pytest.raises(ValueError, match=expected):
        model(torch.zeros(1, *(s,) * d))  # missing channel axis
    with pytest.raises(ValueError, match=expected):
        model(torch.zeros(1, 1, *(s,) * (d + 1)))  # one spatial axis too many
    with pytest.raises(ValueError, match=r"one dict per image \(2\), got 1"):
        model(torch.zeros(2, 1, *(s,) * d), [empty_target(d)])


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(backbone="resnet101"), "model.backbone"),
        (dict(arch="ssd"), "model.arch"),
        (dict(ndim=4), "model.ndim"),
        (dict(num_classes=0), "model.num_classes"),
        (dict(levels=[1, 2]), "model.levels"),
        (dict(backbone="vgg16", levels=[2, 3]), "model.levels"),
        (dict(levels=[2, 3, 4]), "model.anchor_sizes"),
        (dict(norm="layer"), "model.norm"),
        (dict(rpn_objectness_loss="dice"), "model.rpn_objectness_loss"),
    ],
)
def test_bad_detector_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=key) as e:
        build_detector(tiny_config(**{"arch": "faster_rcnn", "d": 2, **change}))
    bad = next(iter(change.values()))
    if key not in ("model.levels", "model.anchor_sizes"):
        assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_anchor_shapes_must_agree_across_levels():
    with pytest.raises(ValueError, match="same number of anchor shapes"):
        build_detector(tiny_config("faster_rcnn", 2, anchor_sizes=[[16], [32, 48]]))


# ------------------------------------------------------------------------------------------------ anchor order


def _coords(loc: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Flat location index -> ``[n, d]`` array coordinates (C order)."""
    out = []
    for s in reversed(size):
        out.append(loc % s)
        loc = loc // s
    return torch.stack(out[::-1], -1)


@pytest.mark.parametrize("d", [2, 3])
def test_flatten_head_outputs_matches_anchor_order(d):
    """Encode (location, anchor, component) in a head output and check flattening gives the AnchorGenerator order."""
    a, k = 3, 2 * d
    sizes = [(3, 5), (2, 3)] if d == 2 else [(2, 3, 4), (1, 2, 3)]
    strides = [4, 8]
    shapes = [[(4.0 + j,) * (d - 1) + (2.0 + 3 * j,) for j in range(a)] for _ in strides]  # three distinct shapes
    gen = AnchorGenerator(shapes=shapes, strides=strides)
    feats = [torch.zeros(2, 1, *sz) for sz in sizes]
    anchors = gen(feats)
    for lvl, sz in enumerate(sizes):
        n_loc = math.prod(sz)
        # value = 1000 * location + 10 * anchor + component, laid out as a head would: [B, A * k, *S]
        loc = torch.arange(n_loc).reshape(sz)
        x = torch.empty(2, a, k, *sz)
        for ai in range(a):
            for ci in range(k):
                x[:, ai, ci] = 1000 * loc + 10 * ai + ci
        flat = flatten_head_outputs(x.reshape(2, a * k, *sz), k)  # [B, L * A, k]
        assert flat.shape == (2, anchors[lvl].shape[0], k)  # one row per anchor
        v = flat[0].long()
        assert (v % 10 == torch.arange(k)).all()  # components in order
        loc_i, anc_i = v[:, 0] // 1000, (v[:, 0] // 10) % 100
        # the AnchorGenerator's anchor at each row: centre at the cell centre of loc_i, extent of shape anc_i
        anc = anchors[lvl]
        centre = (anc[:, :d] + anc[:, d:]) / 2
        extent = anc[:, d:] - anc[:, :d]
        assert torch.allclose(centre, (_coords(loc_i, sz).float() + 0.5) * strides[lvl])
        assert torch.allclose(extent, torch.tensor(shapes[lvl])[anc_i])
        assert torch.equal(flat[1], flat[0])  # per image, same layout


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_anchor_count_equals_head_output_count(arch, d):
    cfg = tiny_config(arch, d, num_classes=3, aspect_ratios=[0.5, 1.0, 2.0]) if d == 2 else tiny_config(
        arch, d, num_classes=3, anchor_sizes=[[8, 12], [16, 24]])
    model = build_detector(cfg)
    s = SIZE[d]
    feats = model.features(torch.zeros(1, 1, *(s,) * d))
    if arch == "faster_rcnn":
        gen = model.rpn.anchor_generator
        logits, deltas = model.rpn.head(feats)
        anchors = gen(feats)
        for lg, dl, an in zip(logits, deltas, anchors):
            assert flatten_head_outputs(lg, 1).shape[1] == an.shape[0]
            assert flatten_head_outputs(dl, 2 * d).shape[1:] == (an.shape[0], 2 * d)
    else:
        gen = model.heads.anchor_generator
        logits, deltas = model.heads.head(feats)
        n = sum(an.shape[0] for an in gen(feats))
        assert logits.shape == (1, n, 3) and deltas.shape == (1, n, 2 * d)
    assert gen.num_anchors_per_location[0] == (3 if d == 2 else 2)


@pytest.mark.parametrize("d", [2, 3])
def test_retina_head_flattening_order(d):
    """RetinaHead concatenates levels in order and each level in the AnchorGenerator order: probe with a head whose
    classification conv outputs a constant per channel (anchor*K + class)."""
    a, k, c = 2, 3, 4
    head = RetinaHead(in_channels=c, num_anchors=a, num_classes=k, ndim=d, depth=1, norm_kind="none")
    with torch.no_grad():
        head.cls.weight.zero_()
        head.cls.bias.copy_(torch.arange(a * k, dtype=torch.float32))
    sizes = [(4,) * d, (2,) * d]
    logits, deltas = head([torch.randn(1, c, *sz) for sz in sizes])
    n = sum(a * math.prod(sz) for sz in sizes)
    assert logits.shape == (1, n, k) and deltas.shape == (1, n, 2 * d)
    expected = torch.arange(a * k, dtype=torch.float32).view(a, k).repeat(n // a, 1)  # row r -> anchor r % A
    assert torch.equal(logits[0], expected)


@pytest.mark.parametrize("d", [2, 3])
def test_rpn_hard_negative_mining_picks_the_highest_loss_negatives(d, monkeypatch):
    """With rpn_negative_sampling="hard" the RPN's negatives are exactly the top-loss negative anchors."""
    import medetect.models.rpn as rpn_mod

    seen = {}
    real = rpn_mod.hard_negative_mining

    def spy(loss, negative, num):
        out = real(loss, negative, num)
        seen.update(loss=loss, negative=negative, num=num, out=out)
        return out

    monkeypatch.setattr(rpn_mod, "hard_negative_mining", spy)
    torch.manual_seed(0)
    size = 64 if d == 2 else 32
    cfg = DetectorConfig(arch="faster_rcnn", ndim=d, in_channels=1, num_classes=1, base_width=8, fpn_channels=8,
                         roi_hidden=8, roi_output_size=2, levels=[2, 3], anchor_sizes=[[8], [16]],
                         aspect_ratios=[1.0], rpn_negative_sampling="hard", rpn_batch_size_per_image=32)
    model = build_detector(cfg).train()
    box = torch.tensor([[4.0] * d + [20.0] * d])
    out = model(torch.randn(1, 1, *(size,) * d), [{"boxes": box, "labels": torch.tensor([0])}])
    sum(out["losses"].values()).backward()
    sel, loss, neg = seen["out"][0], seen["loss"][0], seen["negative"][0]
    k = int(seen["num"][0])
    assert int(sel.sum()) == k > 0 and not (sel & ~neg).any()
    assert loss[sel].min() >= loss[neg & ~sel].max()  # nothing left out scores a higher loss
    with pytest.raises(ValueError, match="model.rpn_negative_sampling"):
        build_detector(DetectorConfig(rpn_negative_sampling="worst"))
