"""Tests for medetect.anchors, medetect.matching and medetect.losses (2D and 3D)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medetect.anchors import AnchorGenerator, anchor_shapes_2d
from medetect.boxes import box_iou, box_sizes
from medetect.losses import giou_loss, sigmoid_focal_loss, smooth_l1_loss
from medetect.matching import IGNORE, NEGATIVE, hard_negative_mining, match_atss, match_by_iou, sample_balanced

DIMS = pytest.mark.parametrize("d", [2, 3])


# ----------------------------------------------------------------------------------------------- anchors


def test_anchor_shapes_2d_sizes_times_ratios():
    shapes = anchor_shapes_2d([32, 64], [0.5, 1.0, 2.0])
    assert len(shapes) == 6
    # ratio-major, size-minor; h / w = ratio, h * w = size ** 2
    for (h, w), (r, s) in zip(shapes, itertools.product([0.5, 1.0, 2.0], [32, 64])):
        assert h / w == pytest.approx(r)
        assert h * w == pytest.approx(s * s)
    with pytest.raises(ValueError, match="aspect_ratios"):
        anchor_shapes_2d([32], [0.0])
    with pytest.raises(ValueError, match="sizes"):
        anchor_shapes_2d([-1], [1.0])


def test_anchors_2d_hand_2x2():
    gen = AnchorGenerator.from_sizes(sizes=[[32]], strides=[16], aspect_ratios=[0.5, 1.0, 2.0])
    a = gen.level_anchors(0, (2, 2))
    assert a.shape == (2 * 2 * 3, 4) and a.dtype == torch.float32
    r2 = math.sqrt(2.0)
    hw = [(32 / r2, 32 * r2), (32.0, 32.0), (32 * r2, 32 / r2)]  # (h, w) for ratios 0.5, 1, 2
    expected = []
    for i in range(2):  # location-major (row-major over the map) ...
        for j in range(2):
            cy, cx = (i + 0.5) * 16, (j + 0.5) * 16  # centres at (i + 0.5) * stride
            for h, w in hw:  # ... anchor-minor
                expected.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
    torch.testing.assert_close(a, torch.tensor(expected))
    # spot values written out: location (0, 0) ratio 1, location (1, 0) ratio 1
    assert a[1].tolist() == [-8.0, -8.0, 24.0, 24.0]
    assert a[2 * 3 + 1].tolist() == [8.0, -8.0, 40.0, 24.0]
    # every anchor has area size**2
    torch.testing.assert_close(box_sizes(a).prod(-1), torch.full((12,), 32.0 * 32.0))


def test_anchors_3d_explicit_shapes():
    shapes = [(4.0, 8.0, 8.0), (8.0, 16.0, 12.0)]
    gen = AnchorGenerator(shapes=[shapes], strides=[(2, 4, 4)])
    size = (1, 2, 3)
    a = gen.level_anchors(0, size)
    assert a.shape == (6 * 2, 6)
    expected = []
    for i, j, k in itertools.product(range(1), range(2), range(3)):
        c = [(i + 0.5) * 2, (j + 0.5) * 4, (k + 0.5) * 4]
        for s in shapes:
            expected.append([c[q] - s[q] / 2 for q in range(3)] + [c[q] + s[q] / 2 for q in range(3)])
    torch.testing.assert_close(a, torch.tensor(expected))
    assert a[0].tolist() == [-1.0, -2.0, -2.0, 3.0, 6.0, 6.0]
    # dtype follows the request
    assert gen.level_anchors(0, size, dtype=torch.float64).dtype == torch.float64


@DIMS
def test_anchor_counts_per_level(d):
    if d == 2:
        gen = AnchorGenerator.from_sizes(sizes=[[16, 24], [32]], strides=[4, 8], aspect_ratios=[0.5, 1.0, 2.0])
        feats = [torch.zeros(2, 3, 8, 6), torch.zeros(2, 3, 4, 3)]
        per_loc = [6, 3]
    else:
        gen = AnchorGenerator.from_sizes(sizes=[[8, 12], [16]], strides=[4, (4, 8, 8)], ndim=3)
        feats = [torch.zeros(1, 2, 4, 5, 6), torch.zeros(1, 2, 4, 3, 3)]
        per_loc = [2, 1]
    assert gen.num_anchors_per_location == per_loc
    out = gen(feats)
    assert len(out) == 2
    for f, a, na in zip(feats, out, per_loc):
        assert a.shape == (math.prod(f.shape[2:]) * na, 2 * d)
    # cubic anchors in 3D
    if d == 3:
        assert torch.equal(box_sizes(out[0])[:2], torch.tensor([[8.0] * 3, [12.0] * 3]))
        # the anisotropic stride of level 1 places centres at (i + 0.5) * (4, 8, 8)
        centres = (out[1][:, :3] + out[1][:, 3:]) / 2
        assert centres[:3].tolist() == [[2.0, 4.0, 4.0], [2.0, 4.0, 12.0], [2.0, 4.0, 20.0]]


def test_anchor_generator_validation():
    with pytest.raises(ValueError, match="shapes and strides"):
        AnchorGenerator(shapes=[[(8, 8)]], strides=[4, 8])
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator(shapes=[[(8, 8)]], strides=[(4, 4, 4)])
    with pytest.raises(ValueError, match="shapes"):
        AnchorGenerator(shapes=[[(8, 8), (8, 8, 8)]], strides=[4])
    with pytest.raises(ValueError, match="aspect_ratios"):
        AnchorGenerator.from_sizes(sizes=[[8]], strides=[4], aspect_ratios=[1.0], ndim=3)
    gen = AnchorGenerator.from_sizes(sizes=[[8]], strides=[4])
    with pytest.raises(ValueError, match="spatial dims"):
        gen.level_anchors(0, (4, 4, 4))
    with pytest.raises(ValueError, match="feature maps"):
        gen([torch.zeros(1, 1, 4, 4)] * 2)
    # an empty feature map gives no anchors
    assert gen.level_anchors(0, (0, 4)).shape == (0, 4)


# ----------------------------------------------------------------------------------------------- match_by_iou


IOU = [
    [0.9, 0.7, 0.69, 0.3, 0.29, 0.1, 0.0],
    [0.1, 0.2, 0.1, 0.1, 0.25, 0.25, 0.0],  # gt 1's best IoU 0.25 ties at anchors 4 and 5
    [0.0] * 7,  # a ground truth overlapping nothing must not make anchors positive
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_by_iou_thresholds(dtype):
    iou = torch.tensor(IOU, dtype=dtype)
    m = match_by_iou(iou, allow_low_quality=False)
    # >= 0.7 positive, < 0.3 negative, in between ignored
    assert m.tolist() == [0, 0, IGNORE, IGNORE, NEGATIVE, NEGATIVE, NEGATIVE]
    assert m.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_by_iou_low_quality_ties(dtype):
    iou = torch.tensor(IOU, dtype=dtype)
    m = match_by_iou(iou)
    # anchors 4 and 5 tie for gt 1's best IoU: both become positive, each matched to its own best ground truth
    # (anchor 4 to gt 0 with 0.29, as in detectron2 / torchvision); anchor 6 overlaps nothing and stays negative
    assert m.tolist() == [0, 0, IGNORE, IGNORE, 0, 1, NEGATIVE]
    # Fast R-CNN head setting: high = low = 0.5
    assert match_by_iou(iou, high=0.5, low=0.5, allow_low_quality=False).tolist() == [0, 0, 0] + [NEGATIVE] * 4


def test_match_by_iou_empty_and_errors():
    assert match_by_iou(torch.zeros(0, 5)).tolist() == [NEGATIVE] * 5
    assert match_by_iou(torch.zeros(0, 5)).dtype == torch.long
    out = match_by_iou(torch.zeros(3, 0))
    assert out.shape == (0,) and out.dtype == torch.long
    with pytest.raises(ValueError, match="iou"):
        match_by_iou(torch.zeros(5))
    with pytest.raises(ValueError, match="low"):
        match_by_iou(torch.zeros(2, 2), high=0.3, low=0.7)


# ----------------------------------------------------------------------------------------------- match_atss


def grid_anchors(d: int, n: int = 4, stride: float = 8.0, size: float = 16.0) -> torch.Tensor:
    return AnchorGenerator(shapes=[[(size,) * d]], strides=[int(stride)]).level_anchors(0, (n,) * d)


@DIMS
def test_match_atss_simple(d):
    anchors = grid_anchors(d)  # centres 4, 12, 20, 28 on every axis
    gt = torch.tensor([[6.0] * d + [22.0] * d])  # centre 14: nearest anchor centre is (12, .., 12)
    topk = d + 1  # the centre anchor and its d neighbours at (12, .., 20, .., 12)
    m = match_atss([anchors], gt, topk=topk)
    centre_idx = sum(1 * 4**q for q in range(d))  # flat index of location (1, .., 1)
    # candidate IoUs by hand: 14^d / (2 * 16^d - 14^d) for the centre, 10 * 14^(d-1) / (...) for the neighbours
    i0 = 14**d / (2 * 16**d - 14**d)
    i1 = 10 * 14 ** (d - 1) / (2 * 16**d - 10 * 14 ** (d - 1))
    cand = torch.tensor([i0] + [i1] * d, dtype=torch.float64)
    thr = float(cand.mean() + cand.std())
    assert i1 < thr <= i0  # only the centre anchor passes the adaptive threshold
    expected = [NEGATIVE] * anchors.shape[0]
    expected[centre_idx] = 0
    assert m.tolist() == expected
    torch.testing.assert_close(box_iou(gt, anchors)[0, centre_idx].double(), torch.tensor(i0, dtype=torch.float64))


@DIMS
def test_match_atss_rules(d):
    anchors = grid_anchors(d)
    centre_idx = sum(4**q for q in range(d))
    # two ground truths want the same anchor: it goes to the one of higher IoU (gt 1 equals the anchor)
    gt = torch.tensor([[6.0] * d + [22.0] * d, [4.0] * d + [20.0] * d])
    m = match_atss([anchors], gt, topk=1)
    assert m[centre_idx].item() == 1
    assert (m >= 0).sum().item() == 1
    # a candidate whose centre lies outside the ground truth is not positive
    tiny = torch.tensor([[0.0] * d + [2.0] * d])  # nearest anchor centre (4, .., 4) is outside [0, 2)
    assert match_atss([anchors], tiny, topk=1).eq(NEGATIVE).all()
    # a second, far level adds fewer than topk candidates without breaking the per-level offsets
    far = AnchorGenerator(shapes=[[(16.0,) * d]], strides=[128]).level_anchors(0, (1,) * d)  # one anchor at 64
    gt0 = gt[:1]
    m2 = match_atss([anchors, far], gt0, topk=d + 1)
    assert m2.shape == (anchors.shape[0] + 1,)
    assert m2.tolist() == match_atss([anchors], gt0, topk=d + 1).tolist() + [NEGATIVE]
    # no ground truth: all negative
    e = match_atss([anchors], torch.zeros(0, 2 * d))
    assert e.shape == (anchors.shape[0],) and e.eq(NEGATIVE).all()


# ----------------------------------------------------------------------------------------------- sampling


def _matches(n_pos: int, n_neg: int, n_ign: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.cat([torch.randint(0, 5, (n_pos,), generator=gen), torch.full((n_neg,), NEGATIVE), torch.full((n_ign,), IGNORE)])
    return m[torch.randperm(m.numel(), generator=gen)]


@pytest.mark.parametrize("n_pos,n_neg", [(500, 1000), (10, 1000), (500, 20), (0, 50), (3, 4)])
def test_sample_balanced_counts_and_pools(n_pos, n_neg):
    gen = torch.Generator().manual_seed(n_pos + n_neg)
    m = _matches(n_pos, n_neg, 77, gen)
    pos, neg = sample_balanced(m, generator=torch.Generator().manual_seed(0))
    assert pos.dtype == torch.bool and pos.shape == m.shape
    assert pos.sum() == min(n_pos, 128)  # at most 256 * 0.5 positives
    assert neg.sum() == min(n_neg, 256 - int(pos.sum()))  # negatives fill the rest
    assert pos.sum() + neg.sum() <= 256
    assert (m[pos] >= 0).all() and (m[neg] == NEGATIVE).all()  # only from the right pools
    assert not (pos & neg).any()


def test_sample_balanced_seeded_and_batched():
    gen = torch.Generator().manual_seed(1)
    m = torch.stack([_matches(300, 900, 50, gen), _matches(5, 1200, 45, gen), _matches(0, 1000, 250, gen)])  # [B, N]
    a = sample_balanced(m, batch_size_per_image=64, positive_fraction=0.25, generator=torch.Generator().manual_seed(7))
    b = sample_balanced(m, batch_size_per_image=64, positive_fraction=0.25, generator=torch.Generator().manual_seed(7))
    c = sample_balanced(m, batch_size_per_image=64, positive_fraction=0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # reproducible
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))  # and actually random
    pos, neg = a
    assert pos.sum(-1).tolist() == [16, 5, 0]  # 64 * 0.25 = 16 per image
    assert neg.sum(-1).tolist() == [48, 59, 64]
    assert (m[pos] >= 0).all() and (m[neg] == NEGATIVE).all()
    # each row equals the per-image call on that row's sampling pools
    for r in range(3):
        p_r, n_r = sample_balanced(m[r], batch_size_per_image=64, positive_fraction=0.25)
        assert p_r.sum() == pos[r].sum() and n_r.sum() == neg[r].sum()
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced(m, positive_fraction=1.5)
    e = sample_balanced(torch.zeros(0, dtype=torch.long))
    assert e[0].shape == (0,) and e[1].shape == (0,)


def test_hard_negative_mining_top_losses():
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 50, generator=gen)
    negative = torch.rand(3, 50, generator=gen) < 0.6
    loss[~negative] += 10.0  # positives have the highest losses but must never be picked
    num = torch.tensor([5, 0, 1000])
    keep = hard_negative_mining(loss, negative, num)
    for r in range(3):
        neg_idx = negative[r].nonzero().flatten()
        k = min(int(num[r]), neg_idx.numel())
        top = neg_idx[loss[r, neg_idx].argsort(descending=True)[:k]]
        assert keep[r].nonzero().flatten().tolist() == sorted(top.tolist())
    # int count, 1-D input
    k1 = hard_negative_mining(loss[0], negative[0], 3)
    assert k1.sum() == 3 and (loss[0][k1].min() >= loss[0][negative[0] & ~k1].max())
    with pytest.raises(ValueError, match="same shape"):
        hard_negative_mining(loss, negative[0], 3)


# ----------------------------------------------------------------------------------------------- losses


def test_smooth_l1_hand_values():
    x = torch.tensor([0.5, -0.5, 2.0, -3.0, 1.0, 0.0])
    t = torch.zeros(6)
    # beta = 1: 0.5 x^2 for |x| < 1, |x| - 0.5 otherwise (continuous at |x| = 1)
    assert smooth_l1_loss(x, t, beta=1.0, reduction="none").tolist() == [0.125, 0.125, 1.5, 2.5, 0.5, 0.0]
    # default beta 1/9
    torch.testing.assert_close(smooth_l1_loss(torch.tensor([0.05]), torch.zeros(1), reduction="none"), torch.tensor([0.5 * 0.0025 * 9]))
    torch.testing.assert_close(smooth_l1_loss(torch.tensor([1.0]), torch.zeros(1), reduction="none"), torch.tensor([1.0 - 0.5 / 9]))
    # beta = 0 is L1
    y = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(smooth_l1_loss(y, z, beta=0.0, reduction="none"), (y - z).abs())
    # reductions
    full = smooth_l1_loss(y, z, beta=0.5, reduction="none")
    torch.testing.assert_close(smooth_l1_loss(y, z, beta=0.5), full.sum())  # default: sum
    torch.testing.assert_close(smooth_l1_loss(y, z, beta=0.5, reduction="mean"), full.mean())
    assert smooth_l1_loss(torch.zeros(0), torch.zeros(0), reduction="mean").item() == 0.0  # no NaN for empty
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1_loss(y, z, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(y, z, beta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        smooth_l1_loss(y, z[:2])


def _focal_by_hand(logits: list[float], targets: list[float], alpha: float, gamma: float) -> list[float]:
    """torchvision.ops.sigmoid_focal_loss, written out term by term."""
    out = []
    for x, t in zip(logits, targets):
        p = 1.0 / (1.0 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss *= alpha * t + (1 - alpha) * (1 - t)
        out.append(loss)
    return out


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 2.0), (0.25, 0.0)])
def test_sigmoid_focal_loss_formula(alpha, gamma):
    logits = [-4.0, -1.0, -0.2, 0.0, 0.3, 1.5, 5.0, 2.0]
    targets = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.3]  # the last is a soft target
    x = torch.tensor(logits, dtype=torch.float64).reshape(2, 4)
    t = torch.tensor(targets, dtype=torch.float64).reshape(2, 4)
    got = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none")
    expected = torch.tensor(_focal_by_hand(logits, targets, alpha, gamma), dtype=torch.float64).reshape(2, 4)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma), expected.sum())
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="mean"), expected.mean())


def test_sigmoid_focal_loss_reduces_to_bce():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=gen) * 3
    t = (torch.rand(5, 7, generator=gen) < 0.3).float()
    bce = -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))
    got = sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0, reduction="none")
    torch.testing.assert_close(got, bce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, t, reduction="none"))
    # integer / bool targets are accepted
    torch.testing.assert_close(sigmoid_focal_loss(x, t.bool()), sigmoid_focal_loss(x, t))
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(x, t[0])


@DIMS
def test_giou_loss(d):
    gen = torch.Generator().manual_seed(d)
    lo = torch.rand(2, 5, d, generator=gen) * 50
    boxes = torch.cat([lo, lo + 1 + torch.rand(2, 5, d, generator=gen) * 20], -1)  # [B, N, 2d]
    pred = boxes.clone().requires_grad_(True)
    loss = giou_loss(pred, boxes, reduction="none")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss, torch.zeros(2, 5), atol=1e-6, rtol=0)  # identical boxes: zero loss
    loss.sum().backward()
    assert pred.grad.isfinite().all()
    # disjoint unit boxes one unit apart: GIoU -1/3, loss 4/3
    a = torch.tensor([[0.0] * d + [1.0] * d])
    b = torch.tensor([[0.0] * (d - 1) + [2.0] + [1.0] * (d - 1) + [3.0]])
    torch.testing.assert_close(giou_loss(a, b), torch.tensor(4 / 3))
    two = torch.cat([a, a]), torch.cat([b, a])
    torch.testing.assert_close(giou_loss(*two, reduction="mean"), torch.tensor(2 / 3))
    torch.testing.assert_close(giou_loss(*two, reduction="sum"), torch.tensor(4 / 3))
    assert giou_loss(torch.zeros(0, 2 * d), torch.zeros(0, 2 * d), reduction="mean").item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        giou_loss(a, torch.cat([b, b]))
    with pytest.raises(ValueError, match="target"):
        giou_loss(a, torch.zeros(1, 2 * d + 2))
    with pytest.raises(ValueError, match="pred"):
        giou_loss(torch.zeros(1, 3), a)
