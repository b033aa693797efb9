"""Proposal baselines (sliding windows, uniform boxes), proposal recall against a slow loop, selective search on a
drawn square, the recall study on synthetic images, and the RPN proposals of the shipped BCCD model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medetect.evaluation.proposals import proposal_recall
from medetect.proposals import selective_search, sliding_windows, uniform_boxes

torch.set_num_threads(1)

try:
    import cv2

    HAS_XIMGPROC = hasattr(cv2, "ximgproc")
except ImportError:
    HAS_XIMGPROC = False
needs_ss = pytest.mark.skipif(not HAS_XIMGPROC, reason="OpenCV contrib (cv2.ximgproc) not installed")
BCCD_WEIGHTS = Path(__file__).resolve().parents[1] / "medetect" / "weights" / "bccd_faster_rcnn.safetensors"


# ------------------------------------------------------------------------------------------------ windows


def test_sliding_windows_grid_by_hand():
    w = sliding_windows((10, 20), sizes=[10], stride_fraction=0.5)
    # one row position (the window fills the height), columns 0, 5, 10
    assert w.tolist() == [[0, 0, 10, 10], [0, 5, 10, 15], [0, 10, 10, 20]]
    r = sliding_windows((16, 16), sizes=[4], aspect_ratios=[4.0], stride_fraction=1.0)
    assert torch.allclose(r[0], torch.tensor([0.0, 0.0, 8.0, 2.0]))  # h / w = 4 at geometric mean side 4
    assert len(r) == 2 * 8  # rows 0, 8 (span 8, stride 8); columns 0, 2, .., 14 (span 14, stride 2)
    assert bool((r[:, 2:] <= 16).all()) and bool((r[:, :2] >= 0).all())


def test_sliding_windows_any_ndim_and_errors():
    w = sliding_windows((8, 8, 8), sizes=[4, 100])
    assert w.shape[1] == 6
    small = w[(w[:, 3:] - w[:, :3] == 4).all(1)]
    assert len(small) == 27  # 3 positions (0, 2, 4) per axis
    assert torch.equal(w[-1], torch.tensor([0.0, 0, 0, 8, 8, 8]))  # a window larger than the image is clipped to it
    with pytest.raises(ValueError, match="2D"):
        sliding_windows((8, 8, 8), sizes=[4], aspect_ratios=[0.5])
    with pytest.raises(ValueError, match="stride_fraction"):
        sliding_windows((8, 8), sizes=[4], stride_fraction=0)
    with pytest.raises(ValueError, match="sizes"):
        sliding_windows((8, 8), sizes=[])


@pytest.mark.parametrize("shape", [(30, 50), (6, 9, 12)])
def test_uniform_boxes(shape):
    b = uniform_boxes(shape, 500, seed=3)
    d = len(shape)
    hi = torch.tensor(shape, dtype=torch.float32)
    assert b.shape == (500, 2 * d)
    assert bool((b[:, :d] >= 0).all()) and bool((b[:, d:] <= hi).all())
    assert bool(((b[:, d:] - b[:, :d]) >= 1 - 1e-5).all())
    assert torch.equal(b, uniform_boxes(shape, 500, seed=3))
    assert not torch.equal(b, uniform_boxes(shape, 500, seed=4))
    assert uniform_boxes(shape, 0).shape == (0, 2 * d)


# ------------------------------------------------------------------------------------------------ recall


def _iou_loop(a, b):
    d = len(a) // 2
    inter, va, vb = 1.0, 1.0, 1.0
    for k in range(d):
        inter *= max(0.0, min(a[d + k], b[d + k]) - max(a[k], b[k]))
        va *= a[d + k] - a[k]
        vb *= b[d + k] - b[k]
    return inter / (va + vb - inter)


def _recall_loop(props, gts, counts, thr):
    out = {f"{t:g}": [] for t in thr}
    total = sum(len(g) for g in gts)
    for t in thr:
        for n in counts:
            hit = 0
            for p, g in zip(props, gts):
                for gb in g.tolist():
                    best = max([_iou_loop(gb, pb) for pb in p[:n].tolist()], default=0.0)
                    hit += best >= t
            out[f"{t:g}"].append(hit / total)
    return out


def _random_boxes(n, d, size, g):
    lo = torch.rand(n, d, generator=g) * size
    return torch.cat([lo, lo + 1 + torch.rand(n, d, generator=g) * size / 2], 1)


@pytest.mark.parametrize("d", [2, 3])
def test_proposal_recall_matches_loop(d):
    g = torch.Generator().manual_seed(d)
    gts = [_random_boxes(n, d, 20, g) for n in (4, 0, 6)]
    props = [torch.cat([gts[0][:2] + 0.5, _random_boxes(30, d, 20, g)]), _random_boxes(5, d, 20, g),
             torch.zeros(0, 2 * d)]  # the third image has no proposals: its objects are missed
    counts = [1, 2, 5, 10, 40]
    r = proposal_recall(props, gts, counts, (0.3, 0.5, 0.7))
    ref = _recall_loop(props, gts, counts, (0.3, 0.5, 0.7))
    for t in ("0.3", "0.5", "0.7"):
        assert r["recall"][t] == pytest.approx(ref[t], abs=1e-12)
    assert r["num_gt"] == 10 and r["num_images"] == 3
    assert r["mean_proposals"][-1] == pytest.approx((32 + 5 + 0) / 3)
    assert r["recall"]["0.7"][-1] <= 0.4  # at most the 4 objects of the first image


def test_proposal_recall_by_hand_and_errors():
    gt = [torch.tensor([[0.0, 0, 10, 10]])]
    props = [torch.tensor([[0.0, 0, 10, 5], [0.0, 0, 10, 10]])]  # IoU 0.5, then 1
    r = proposal_recall(props, gt, [1, 2], (0.5, 0.7))
    assert r["recall"] == {"0.5": [1.0, 1.0], "0.7": [0.0, 1.0]}
    assert r["best_iou_mean"] == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError, match="counts"):
        proposal_recall(props, gt, [0])
    with pytest.raises(ValueError, match="one entry per image"):
        proposal_recall(props, gt + gt, [1])


# ------------------------------------------------------------------------------------------------ selective search


def _square_image():
    img = torch.full((3, 96, 128), 200.0)
    img[0, 30:62, 40:80], img[1, 30:62, 40:80], img[2, 30:62, 40:80] = 180.0, 20.0, 30.0  # a red rectangle
    return img, torch.tensor([[30.0, 40.0, 62.0, 80.0]])


@needs_ss
def test_selective_search_finds_a_drawn_square():
    img, box = _square_image()
    props = selective_search(img, mode="fast", base_k=50, inc_k=100)
    assert len(props) > 0
    r = proposal_recall([props], [box], [len(props)], (0.9,))
    assert r["recall"]["0.9"] == [1.0]


def _synthetic_set():
    from medetect.lineage.data import LineageSet

    img, box = _square_image()
    img2 = torch.full((3, 64, 64), 90.0)
    img2[:, 10:30, 20:44] = 240.0
    return LineageSet([img, img2], [box, torch.tensor([[10.0, 20.0, 30.0, 44.0]])],
                      [torch.zeros(1, dtype=torch.long)] * 2, ["a.png", "b.png"], ["thing"], 1.0, "synthetic")


@needs_ss
def test_recall_study_writes_plot_and_json(tmp_path):
    from medetect.lineage.recall import recall_study

    res = recall_study({"toy": _synthetic_set()}, ["selective search (fast)", "sliding windows", "uniform", "RPN"],
                       counts=[5, 50, 500], cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")
    ds = res["datasets"]["toy"]
    assert set(ds["methods"]) == {"selective search (fast)", "sliding windows", "uniform"}
    assert ds["skipped"] == {"RPN": "no RPN weights for this dataset"}
    assert ds["methods"]["selective search (fast)"]["recall"]["0.7"][-1] == 1.0
    assert json.loads((tmp_path / "out" / "recall.json").read_text())["counts"] == [5, 50, 500]
    assert (tmp_path / "out" / "recall.png").read_bytes()[:4] == b"\x89PNG"
    # the second run reads selective search from the cache
    again = recall_study({"toy": _synthetic_set()}, ["selective search (fast)"], counts=[5, 500],
                         cache_dir=tmp_path / "cache")
    assert again["datasets"]["toy"]["methods"]["selective search (fast)"]["cached_images"] == 2


def test_recall_study_image_without_regions(monkeypatch):
    import medetect.lineage.recall as rec

    monkeypatch.setattr(rec, "proposals_for", lambda data, cfg, cache=None, progress=False: [torch.zeros(0, 4)])
    with pytest.warns(RuntimeWarning, match="found no region in 2 of 2 images"):
        res = rec.recall_study({"toy": _synthetic_set()}, ["selective search (fast)"], counts=[10])
    m = res["datasets"]["toy"]["methods"]["selective search (fast)"]
    assert m["images_without_proposals"] == 2 and m["recall"]["0.5"] == [0.0]
    with pytest.raises(ValueError, match="unknown proposal method"):
        rec.recall_study({"toy": _synthetic_set()}, ["edge boxes"])


@pytest.mark.skipif(not BCCD_WEIGHTS.is_file(), reason="shipped BCCD weights missing")
def test_rpn_proposals_of_the_shipped_model():
    from medetect.lineage.recall import rpn_proposals

    data = _synthetic_set()
    data.scale = 0.5  # the model's own scale: no resize
    props, secs = rpn_proposals(BCCD_WEIGHTS, data, 300)
    assert len(props) == 2 and len(secs) == 2
    for p, img in zip(props, data.images):
        assert 0 < len(p) <= 300
        assert bool((p[:, 2] <= img.shape[1] + 1e-3).all()) and bool((p[:, 3] <= img.shape[2] + 1e-3).all())
    data.scale = 1.0  # the model wants half of it: resized by 0.5, boxes mapped back to these pixels
    props2, _ = rpn_proposals(BCCD_WEIGHTS, data, 50)
    assert 0 < len(props2[0]) <= 50 and float(props2[0][:, 2].max()) > data.images[0].shape[1] / 2


def test_sliding_window_order_takes_every_shape_in_turn():
    from medetect.lineage.recall import _round_robin

    w = sliding_windows((60, 80), sizes=[8, 16, 32], aspect_ratios=[0.5, 1.0, 2.0])
    order = _round_robin(w, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(len(w)))  # a permutation
    first = (w[:, 2:] - w[:, :2])[order[:9]]  # the first 9 windows: one of each of the 9 shapes
    apart = (first[:, None] - first[None]).abs().amax(-1) > 1e-3
    assert bool(apart[~torch.eye(9, dtype=torch.bool)].all())
