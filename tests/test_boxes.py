"""Tests for medetect.boxes: hand cases, loop references, property tests, bad input, cross-checks.

Every test runs in 2D and 3D (``d``). The loop references below are deliberately slow and plain: they are the spec.
Cross-checks against torchvision run only where torchvision is importable; against MONAI only where MONAI is.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medetect.boxes as B
from medetect.boxes import (
    BoxCoder,
    batched_nms,
    box_area,
    box_centres,
    box_iou,
    box_sizes,
    clip_boxes,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    nms,
    nms_mask,
    remove_small_boxes,
)
from medetect.convert import boxes_to_xyxy, boxes_to_xyzxyz

DIMS = pytest.mark.parametrize("d", [2, 3])
HYP = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------------------------- helpers


def unit_box(d: int, offset=0.0) -> list[float]:
    """The unit square/cube ``[0, 1)^d`` shifted by ``offset`` (scalar or per axis)."""
    off = [offset] * d if isinstance(offset, (int, float)) else list(offset)
    return [o for o in off] + [o + 1.0 for o in off]


def random_boxes(n: int, d: int, gen: torch.Generator, dtype=torch.float32, extent=100.0, smin=2.0, smax=30.0):
    lo = torch.rand(n, d, generator=gen, dtype=torch.float64) * extent
    size = smin + torch.rand(n, d, generator=gen, dtype=torch.float64) * (smax - smin)
    return torch.cat([lo, lo + size], dim=-1).to(dtype)


def clustered_boxes(n: int, d: int, gen: torch.Generator, dtype=torch.float32, clusters: int = 20, extent=256.0):
    """Detector-like boxes: jittered copies around a few centres, sizes 10-60."""
    centres = torch.rand(clusters, d, generator=gen, dtype=torch.float64) * extent
    base = 10 + torch.rand(clusters, d, generator=gen, dtype=torch.float64) * 50
    k = torch.randint(0, clusters, (n,), generator=gen)
    size = base[k] * (0.7 + 0.6 * torch.rand(n, d, generator=gen, dtype=torch.float64))
    ctr = centres[k] + (torch.rand(n, d, generator=gen, dtype=torch.float64) - 0.5) * base[k] * 0.5
    return torch.cat([ctr - size / 2, ctr + size / 2], dim=-1).to(dtype)


def ref_iou(a: list[float], b: list[float], exact: bool = False):
    """IoU of two boxes by the definition; ``exact`` uses rationals (exact for float inputs)."""
    num = Fraction if exact else float
    d = len(a) // 2
    inter, va, vb = num(1), num(1), num(1)
    for k in range(d):
        inter *= max(num(0), num(min(a[d + k], b[d + k])) - num(max(a[k], b[k])))
        va *= num(a[d + k]) - num(a[k])
        vb *= num(b[d + k]) - num(b[k])
    union = va + vb - inter
    return inter / union if union > 0 else num(0)


def ref_giou(a: list[float], b: list[float]) -> float:
    d = len(a) // 2
    inter, va, vb, enc = 1.0, 1.0, 1.0, 1.0
    for k in range(d):
        inter *= max(0.0, min(a[d + k], b[d + k]) - max(a[k], b[k]))
        va *= a[d + k] - a[k]
        vb *= b[d + k] - b[k]
        enc *= max(a[d + k], b[d + k]) - min(a[k], b[k])
    union = va + vb - inter
    iou = inter / union if union > 0 else 0.0
    return iou - ((enc - union) / enc if enc > 0 else 0.0)


def ref_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float, labels: torch.Tensor | None = None) -> list[int]:
    """Greedy NMS, one box at a time: rank by decreasing score (ties: lower index first); drop a box when its IoU
    with an already kept box (of the same label) is strictly greater than ``thr``. IoU is computed exactly."""
    bl, sl = boxes.tolist(), scores.tolist()
    ll = labels.tolist() if labels is not None else [0] * len(bl)
    order = sorted(range(len(bl)), key=lambda i: (-sl[i], i))
    kept: list[int] = []
    t = Fraction(thr)
    for i in order:
        if all(ll[j] != ll[i] or not ref_iou(bl[i], bl[j], exact=True) > t for j in kept):
            kept.append(i)
    return kept


def assert_names(exc_info, name: str, shape_hint: str | None = None) -> None:
    msg = str(exc_info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg), f"{name!r} not named in: {msg}"
    if shape_hint is not None:
        assert shape_hint in msg, f"expected shape {shape_hint!r} not in: {msg}"


# ----------------------------------------------------------------------------------------------- hypothesis strategies


@st.composite
def grid_box_sets(draw, d: int, max_n: int = 24, labels: bool = False):
    """Boxes on an integer grid (so IoU is exact in float), many duplicates, zero-size boxes, tied scores."""
    coord = st.integers(0, 10)
    size = st.integers(0, 6)  # 0 = a degenerate (zero-size) axis
    base = draw(
        st.lists(st.tuples(st.lists(coord, min_size=d, max_size=d), st.lists(size, min_size=d, max_size=d)), min_size=1, max_size=10)
    )
    base = [lo + [l + s for l, s in zip(lo, sz)] for lo, sz in base]
    n = draw(st.integers(0, max_n))
    pick = draw(st.lists(st.integers(0, len(base) - 1), min_size=n, max_size=n))
    top = draw(st.sampled_from([2, 1000]))  # few distinct scores (many ties) or mostly distinct
    scores = draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
    out = {
        "boxes": torch.tensor([base[i] for i in pick], dtype=torch.float32).reshape(n, 2 * d),
        "scores": torch.tensor(scores, dtype=torch.float32) / top,
    }
    if labels:
        out["labels"] = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=torch.long)
    return out


@st.composite
def real_boxes(draw, d: int, max_n: int = 8, allow_empty: bool = True):
    f = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)
    s = st.floats(0 if allow_empty else 0.5, 40, allow_nan=False, allow_infinity=False, width=32)
    n = draw(st.integers(1, max_n))
    rows = []
    for _ in range(n):
        lo = draw(st.lists(f, min_size=d, max_size=d))
        sz = draw(st.lists(s, min_size=d, max_size=d))
        rows.append(lo + [a + b for a, b in zip(lo, sz)])
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- hand cases


@DIMS
def test_area_sizes_centres_hand(d):
    box = torch.tensor([[1.0, 2.0, 3.0][:d] + [2.0, 5.0, 7.0][:d]])  # extents 1, 3, 4
    assert box_sizes(box).tolist() == [[1.0, 3.0, 4.0][:d]]
    assert box_centres(box).tolist() == [[1.5, 3.5, 5.0][:d]]
    assert box_area(box).tolist() == [[3.0, 12.0][d - 2]]
    # leading batch dims are kept
    assert box_area(box.expand(2, 3, 2 * d)).shape == (2, 3)


@DIMS
def test_iou_unit_boxes_offset_by_half(d):
    a = torch.tensor([unit_box(d)])
    b = torch.tensor([unit_box(d, 0.5)])
    inter = 0.5**d
    expected = inter / (2 - inter)  # 2D 1/7, 3D 1/15
    assert box_iou(a, b).item() == pytest.approx(expected)
    assert box_iou(a, b).item() == pytest.approx({2: 1 / 7, 3: 1 / 15}[d])
    # shifted by half along one axis only: inter 1/2, union 3/2
    c = torch.tensor([unit_box(d, [0.5] + [0.0] * (d - 1))])
    assert box_iou(a, c).item() == pytest.approx(1 / 3)
    assert elementwise_box_iou(a, c).item() == pytest.approx(1 / 3)
    assert box_iou(a, a).item() == 1.0
    # touching boxes (half-open) do not overlap
    t = torch.tensor([unit_box(d, [1.0] + [0.0] * (d - 1))])
    assert box_iou(a, t).item() == 0.0


@DIMS
def test_giou_disjoint_hand(d):
    a = torch.tensor([unit_box(d)])
    b = torch.tensor([unit_box(d, [0.0] * (d - 1) + [2.0])])  # one unit gap along the last axis
    # inter 0, union 2, enclosing box 1 x .. x 3 -> GIoU = 0 - (3 - 2) / 3
    assert generalized_box_iou(a, b).item() == pytest.approx(-1 / 3)
    assert elementwise_generalized_box_iou(a, b).item() == pytest.approx(-1 / 3)
    # nested boxes: enclosing box == union, so GIoU == IoU
    big = torch.tensor([[0.0] * d + [2.0] * d])
    assert generalized_box_iou(a, big).item() == pytest.approx(box_iou(a, big).item()) == pytest.approx(0.5**d)
    # far apart: GIoU -> -1
    far = torch.tensor([unit_box(d, 1000.0)])
    assert generalized_box_iou(a, far).item() == pytest.approx(-1.0, abs=1e-5)


@DIMS
def test_degenerate_boxes_iou(d):
    empty = torch.tensor([[3.0] * d + [3.0] * d, [0.0] * d + [0.0] + [1.0] * (d - 1)])  # a point, a flat box
    full = torch.tensor([[0.0] * d + [5.0] * d])
    assert box_iou(empty, empty).eq(0).all()  # 0/0 is defined as 0, not NaN
    assert box_iou(empty, full).eq(0).all()
    assert generalized_box_iou(empty, empty).isfinite().all()
    assert generalized_box_iou(empty, full).isfinite().all()


@DIMS
def test_clip_boxes_hand(d):
    shape = (10, 20, 30)[:d]
    boxes = torch.tensor([[-5.0, 3.0, -1.0][:d] + [15.0, 25.0, 12.0][:d], [1.0] * d + [2.0] * d])
    out = clip_boxes(boxes, shape)
    assert out.tolist() == [[0.0, 3.0, 0.0][:d] + [10.0, 20.0, 12.0][:d], [1.0] * d + [2.0] * d]
    assert out.dtype == boxes.dtype
    # batch dims kept
    assert clip_boxes(boxes.expand(3, 2, 2 * d), shape).shape == (3, 2, 2 * d)


@DIMS
def test_remove_small_boxes_hand(d):
    boxes = torch.tensor(
        [
            [0.0] * d + [2.0] * d,  # all extents 2: kept at min_size 2 (>=)
            [0.0] * d + [1.5] + [5.0] * (d - 1),  # one short axis: removed
            [0.0] * d + [5.0] * (d - 1) + [1.9],  # short last axis: removed
            [1.0] * d + [10.0] * d,  # kept
        ]
    )
    keep = remove_small_boxes(boxes, 2.0)
    assert keep.tolist() == [0, 3]
    assert keep.dtype == torch.long
    assert remove_small_boxes(boxes, 0.0).tolist() == [0, 1, 2, 3]


@DIMS
def test_nms_threshold_is_strict(d):
    # two boxes with IoU exactly 1/2 (inter 2 units, union 4... in 1D along axis 0; other axes equal)
    a = [0.0] * d + [3.0] + [1.0] * (d - 1)
    b = [1.0] + [0.0] * (d - 1) + [4.0] + [1.0] * (d - 1)  # inter 2, union 4
    boxes = torch.tensor([a, b])
    scores = torch.tensor([0.9, 0.8])
    assert box_iou(boxes[:1], boxes[1:]).item() == 0.5
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # IoU == threshold: not suppressed
    assert nms(boxes, scores, 0.49).tolist() == [0]
    assert nms(boxes, scores, 0.0).tolist() == [0]
    assert nms(boxes, scores, 1.0).tolist() == [0, 1]


@DIMS
def test_nms_ties_and_duplicates_hand(d):
    box = [0.0] * d + [4.0] * d
    boxes = torch.tensor([box, box, box, [10.0] * d + [12.0] * d])
    scores = torch.tensor([0.5, 0.7, 0.7, 0.1])
    # ranks: 1, 2 (tie: lower index first), 0, 3 -> 1 kept, 2 and 0 suppressed (IoU 1 > t), 3 kept
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == [1, 3]
    assert keep.dtype == torch.long
    assert nms_mask(boxes, scores, 0.5).tolist() == [False, True, False, True]
    # duplicates survive threshold 1 (IoU 1 is not > 1)
    assert nms(boxes, scores, 1.0).tolist() == [1, 2, 0, 3]


@DIMS
def test_nms_long_suppression_chain(d):
    # sliding boxes, each overlapping the next by 3/4: greedy keeps every other one. A chain this long needs many
    # rounds of the vectorised fixed point, beyond one batch of _ROUNDS.
    n = 31
    lo = torch.arange(n, dtype=torch.float32)
    boxes = torch.zeros(n, 2 * d)
    boxes[:, 0], boxes[:, d] = lo, lo + 4.0  # IoU(i, i+1) = 3/5, IoU(i, i+2) = 2/6
    boxes[:, d + 1 :] = 1.0
    scores = torch.linspace(1.0, 0.0, n)
    assert nms(boxes, scores, 0.5).tolist() == list(range(0, n, 2))
    assert nms(boxes, scores, 0.5).tolist() == ref_nms(boxes, scores, 0.5)
    assert nms(boxes, scores, 0.3).tolist() == ref_nms(boxes, scores, 0.3)


@DIMS
def test_batched_nms_hand(d):
    box = [0.0] * d + [4.0] * d
    boxes = torch.tensor([box, box, box])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 1, 0])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 1]
    assert nms_mask(boxes, scores, 0.5, labels).tolist() == [True, True, False]


# ----------------------------------------------------------------------------------------------- loop references


@DIMS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iou_giou_match_loop_reference(d, dtype):
    gen = torch.Generator().manual_seed(d)
    a = random_boxes(13, d, gen, dtype, extent=30)
    b = random_boxes(11, d, gen, dtype, extent=30)
    al, bl = a.tolist(), b.tolist()
    iou_ref = torch.tensor([[ref_iou(x, y) for y in bl] for x in al], dtype=torch.float64)
    giou_ref = torch.tensor([[ref_giou(x, y) for y in bl] for x in al], dtype=torch.float64)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert box_iou(a, b).dtype == dtype
    torch.testing.assert_close(box_iou(a, b).double(), iou_ref, **tol)
    torch.testing.assert_close(generalized_box_iou(a, b).double(), giou_ref, **tol)
    assert (iou_ref > 0).any() and (iou_ref == 0).any()  # the case has both overlaps and misses
    # elementwise = diagonal of pairwise, with broadcasting
    torch.testing.assert_close(elementwise_box_iou(a[:11], b), box_iou(a[:11], b).diagonal())
    torch.testing.assert_close(elementwise_generalized_box_iou(a[:11], b), generalized_box_iou(a[:11], b).diagonal())
    torch.testing.assert_close(elementwise_box_iou(a[:, None], b[None]), box_iou(a, b))


@DIMS
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_random_real_boxes_match_reference(d, thr):
    gen = torch.Generator().manual_seed(10 * d + int(thr * 10))
    boxes = clustered_boxes(120, d, gen, clusters=8, extent=120.0).double()
    scores = torch.rand(120, generator=gen, dtype=torch.float64)
    keep = nms(boxes, scores, thr)
    assert keep.tolist() == ref_nms(boxes, scores, thr)
    labels = torch.randint(0, 3, (120,), generator=gen)
    assert batched_nms(boxes, scores, labels, thr).tolist() == ref_nms(boxes, scores, thr, labels)


@DIMS
def test_nms_chunked_path_matches_reference(d, monkeypatch):
    # force the row-chunked suppression matrix (normally only for N > 4096) on a small input
    monkeypatch.setattr(B, "_NMS_CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(3)
    boxes = clustered_boxes(70, d, gen, clusters=5, extent=80.0)
    scores = torch.rand(70, generator=gen)
    labels = torch.randint(0, 2, (70,), generator=gen)
    assert nms(boxes, scores, 0.4).tolist() == ref_nms(boxes, scores, 0.4)
    assert batched_nms(boxes, scores, labels, 0.4).tolist() == ref_nms(boxes, scores, 0.4, labels)


@DIMS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_boxes_decide_in_float32(d, dtype):
    # bf16/fp16 boxes: IoU and NMS decisions are those of the (exactly representable) low-precision coordinates
    # computed in float64, not of arithmetic rounded to 8 significant bits.
    gen = torch.Generator().manual_seed(7 + d)
    boxes = clustered_boxes(150, d, gen, clusters=6, extent=100.0).to(dtype)
    scores = torch.rand(150, generator=gen)
    exact = boxes.double()
    iou = box_iou(boxes, boxes)
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou.double(), box_iou(exact, exact), rtol=1e-6, atol=1e-6)
    assert elementwise_box_iou(boxes, boxes.flip(0)).dtype == torch.float32
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == ref_nms(exact, scores.double(), thr)


@DIMS
def test_nms_threshold_zero_with_huge_box_takes_band_path(d, monkeypatch):
    # IoU > 0 with one box covering the whole image: the widest band is N, but the total work stays small, so the
    # band path (not the dense N^2 triangle) must be taken, and the result must stay exact.
    gen = torch.Generator().manual_seed(11 + d)
    boxes = random_boxes(400, d, gen, extent=400.0, smin=2.0, smax=12.0)
    boxes[0] = torch.tensor([0.0] * d + [400.0] * d)
    scores = torch.rand(400, generator=gen)
    expected = ref_nms(boxes, scores, 0.0)

    def dense(*a, **k):
        raise AssertionError("dense path taken")

    monkeypatch.setattr(B, "_suppression_matrix", dense)
    monkeypatch.setattr(B, "_band_rows", lambda device: 16)
    assert nms(boxes, scores, 0.0).tolist() == expected


# ----------------------------------------------------------------------------------------------- property tests


THRESHOLDS = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


@DIMS
@HYP
@given(data=st.data(), thr=THRESHOLDS)
def test_prop_nms_equals_reference(d, data, thr):
    case = data.draw(grid_box_sets(d))
    boxes, scores = case["boxes"], case["scores"]
    expected = ref_nms(boxes, scores, thr)
    keep = nms(boxes, scores, thr)
    assert keep.tolist() == expected
    assert keep.dtype == torch.long
    mask = nms_mask(boxes, scores, thr)
    assert mask.nonzero().flatten().tolist() == sorted(expected)
    # float64 gives the same answer
    assert nms(boxes.double(), scores.double(), thr).tolist() == expected


@DIMS
@HYP
@given(data=st.data(), thr=THRESHOLDS)
def test_prop_batched_nms_equals_per_label_reference(d, data, thr):
    case = data.draw(grid_box_sets(d, labels=True))
    boxes, scores, labels = case["boxes"], case["scores"], case["labels"]
    expected = ref_nms(boxes, scores, thr, labels)
    assert batched_nms(boxes, scores, labels, thr).tolist() == expected
    # = per-label nms, merged in rank order
    per_label = []
    for lab in labels.unique().tolist():
        idx = (labels == lab).nonzero().flatten()
        per_label += idx[nms(boxes[idx], scores[idx], thr)].tolist()
    assert sorted(per_label) == sorted(expected)


@DIMS
@HYP
@given(data=st.data())
def test_prop_iou_giou_ranges(d, data):
    a = data.draw(real_boxes(d))
    b = data.draw(real_boxes(d))
    iou_ab, iou_ba = box_iou(a, b), box_iou(b, a)
    assert torch.equal(iou_ab, iou_ba.T)  # symmetric
    assert ((iou_ab >= 0) & (iou_ab <= 1)).all()
    giou = generalized_box_iou(a, b)
    assert ((giou >= -1 - 1e-12) & (giou <= 1 + 1e-12)).all()
    assert (giou <= iou_ab + 1e-12).all()
    torch.testing.assert_close(giou, generalized_box_iou(b, a).T)
    nonempty = box_area(a) > 0
    torch.testing.assert_close(box_iou(a, a).diagonal()[nonempty], torch.ones(int(nonempty.sum()), dtype=a.dtype))
    torch.testing.assert_close(generalized_box_iou(a, a).diagonal()[nonempty], torch.ones(int(nonempty.sum()), dtype=a.dtype))
    ref = torch.tensor([[ref_iou(x, y) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    torch.testing.assert_close(iou_ab, ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------- BoxCoder


def _coder_case(n: int, d: int, gen: torch.Generator, extent: float, smin: float, smax: float, spread=1.0):
    lo = torch.rand(n, d, generator=gen) * extent
    sz = smin + torch.rand(n, d, generator=gen) * (smax - smin)
    anchors = torch.cat([lo, lo + sz], -1)
    glo = lo + (torch.rand(n, d, generator=gen) - 0.5) * sz * spread
    gsz = sz * torch.exp((torch.rand(n, d, generator=gen) - 0.5) * 2 * spread)
    return torch.cat([glo, glo + gsz], -1), anchors


def _weights(d, weighted):
    return (10.0,) * d + (5.0,) * d if weighted else None


@DIMS
@pytest.mark.parametrize("weighted", [False, True])
def test_boxcoder_round_trip_fp32(d, weighted):
    gen = torch.Generator().manual_seed(d + 2 * weighted)
    gt, anchors = _coder_case(500, d, gen, extent=400, smin=4, smax=100)
    coder = BoxCoder(weights=_weights(d, weighted))
    deltas = coder.encode(gt, anchors)
    assert deltas.shape == gt.shape and deltas.dtype == torch.float32
    out = coder.decode(deltas, anchors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gt, rtol=1e-6, atol=2e-4)
    # identity: a box encodes to zero against itself
    torch.testing.assert_close(coder.encode(anchors, anchors), torch.zeros_like(anchors))


@DIMS
def test_boxcoder_hand_values(d):
    anchors = torch.tensor([[0.0] * d + [10.0] * d])
    gt = torch.tensor([[2.0] * d + [22.0] * d])  # centre 5 -> 12 (shift 0.7 sizes), size 10 -> 20
    expected = [0.7] * d + [math.log(2.0)] * d
    torch.testing.assert_close(BoxCoder().encode(gt, anchors), torch.tensor([expected]))
    w = _weights(d, True)
    torch.testing.assert_close(BoxCoder(weights=w).encode(gt, anchors), torch.tensor([[e * x for e, x in zip(expected, w)]]))


@DIMS
@pytest.mark.parametrize("weighted", [False, True])
def test_boxcoder_round_trip_bf16(d, weighted):
    gen = torch.Generator().manual_seed(7 + d + 2 * weighted)
    gt, anchors = _coder_case(500, d, gen, extent=48, smin=16, smax=64, spread=0.5)
    gt, anchors = gt.bfloat16(), anchors.bfloat16()
    coder = BoxCoder(weights=_weights(d, weighted))
    deltas = coder.encode(gt, anchors)
    assert deltas.dtype == torch.bfloat16
    out = coder.decode(deltas, anchors)
    assert out.dtype == torch.bfloat16
    size = box_sizes(gt.float()).repeat(1, 2)  # [N, 2d]: each coordinate's error relative to its box extent
    assert ((out.float() - gt.float()).abs() / size).max() < 1e-2


@DIMS
@pytest.mark.parametrize("weighted", [False, True])
def test_boxcoder_scale_clamp(d, weighted):
    w = _weights(d, weighted)
    coder = BoxCoder(weights=w)
    anchors = torch.tensor([[0.0] * d + [16.0] * d])
    ws = 5.0 if weighted else 1.0
    huge = torch.tensor([[0.0] * d + [100.0 * ws] * d])
    out = coder.decode(huge, anchors)
    # clamped to log(1000/16): size 16 * 62.5 = 1000, centred on the anchor's centre 8
    torch.testing.assert_close(out, torch.tensor([[8.0 - 500.0] * d + [8.0 + 500.0] * d]))
    assert B.DEFAULT_SCALE_CLAMP == pytest.approx(math.log(1000 / 16))
    # just below the clamp: not clamped
    below = torch.tensor([[0.0] * d + [math.log(50.0) * ws] * d])
    torch.testing.assert_close(box_sizes(coder.decode(below, anchors)), torch.full((1, d), 800.0))
    # a huge negative log-size stays finite and non-negative
    neg = coder.decode(-huge, anchors)
    assert neg.isfinite().all() and (box_sizes(neg) >= 0).all()
    # custom clamp
    c2 = BoxCoder(weights=w, scale_clamp=math.log(2.0))
    torch.testing.assert_close(box_sizes(c2.decode(huge, anchors)), torch.full((1, d), 32.0))


@DIMS
def test_boxcoder_broadcasting_per_class_deltas(d):
    gen = torch.Generator().manual_seed(11)
    n, k = 6, 4
    _, anchors = _coder_case(n, d, gen, extent=100, smin=5, smax=40)
    deltas = torch.randn(n, k, 2 * d, generator=gen) * 0.3
    coder = BoxCoder(weights=_weights(d, True))
    out = coder.decode(deltas, anchors[:, None, :])  # [N, K, 2d] with [N, 1, 2d]
    assert out.shape == (n, k, 2 * d)
    for j in range(k):
        torch.testing.assert_close(out[:, j], coder.decode(deltas[:, j], anchors))
    # encode broadcasts the same way
    enc = coder.encode(out, anchors[:, None, :])
    torch.testing.assert_close(enc, deltas, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- bad input


def _bad_cases(d: int):
    """(id, thunk, exception, argument name, expected-shape text or None)."""
    good = torch.tensor([[0.0] * d + [1.0] * d] * 3)
    odd = torch.zeros(3, 2 * d - 1)
    zero = torch.zeros(3, 0)
    ints = torch.zeros(3, 2 * d, dtype=torch.long)
    other_d = torch.zeros(3, 2 * d + 2)
    meta_boxes = torch.empty(3, 2 * d, device="meta")
    scores = torch.rand(3)
    labels = torch.zeros(3, dtype=torch.long)
    lst = good.tolist()
    coder = BoxCoder()
    shp = "2d]"
    cases = []
    for fn in (box_area, box_sizes, box_centres):
        cases += [
            (f"{fn.__name__}-odd", lambda fn=fn: fn(odd), ValueError, "boxes", shp),
            (f"{fn.__name__}-zero", lambda fn=fn: fn(zero), ValueError, "boxes", shp),
            (f"{fn.__name__}-int", lambda fn=fn: fn(ints), TypeError, "boxes", shp),
            (f"{fn.__name__}-list", lambda fn=fn: fn(lst), TypeError, "boxes", shp),
        ]
    for fn in (box_iou, generalized_box_iou, elementwise_box_iou, elementwise_generalized_box_iou):
        nm = fn.__name__
        cases += [
            (f"{nm}-a-odd", lambda fn=fn: fn(odd, good), ValueError, "a", shp),
            (f"{nm}-b-zero", lambda fn=fn: fn(good, zero), ValueError, "b", shp),
            (f"{nm}-b-other-d", lambda fn=fn: fn(good, other_d), ValueError, "b", str(2 * d)),
            (f"{nm}-a-int", lambda fn=fn: fn(ints, good), TypeError, "a", shp),
            (f"{nm}-b-list", lambda fn=fn: fn(good, lst), TypeError, "b", shp),
            (f"{nm}-device", lambda fn=fn: fn(good, meta_boxes), ValueError, "b", None),
        ]
    for fn in (box_iou, generalized_box_iou):
        cases.append((f"{fn.__name__}-a-3d", lambda fn=fn: fn(good[None], good), ValueError, "a", "[N, 2d]"))
    cases += [
        ("clip-odd", lambda: clip_boxes(odd, (5,) * d), ValueError, "boxes", shp),
        ("clip-int", lambda: clip_boxes(ints, (5,) * d), TypeError, "boxes", shp),
        ("clip-shape", lambda: clip_boxes(good, (5,) * (d + 1)), ValueError, "shape", f"{d} entries"),
        ("remove-1d", lambda: remove_small_boxes(good[0], 1.0), ValueError, "boxes", "[N, 2d]"),
        ("remove-int", lambda: remove_small_boxes(ints, 1.0), TypeError, "boxes", shp),
    ]
    for fn in (nms, nms_mask):
        nm = fn.__name__
        cases += [
            (f"{nm}-odd", lambda fn=fn: fn(odd, scores, 0.5), ValueError, "boxes", shp),
            (f"{nm}-zero", lambda fn=fn: fn(zero, scores, 0.5), ValueError, "boxes", shp),
            (f"{nm}-int", lambda fn=fn: fn(ints, scores, 0.5), TypeError, "boxes", shp),
            (f"{nm}-list", lambda fn=fn: fn(lst, scores, 0.5), TypeError, "boxes", shp),
            (f"{nm}-3d", lambda fn=fn: fn(good[None], scores, 0.5), ValueError, "boxes", "[N, 2d]"),
            (f"{nm}-scores-len", lambda fn=fn: fn(good, torch.rand(4), 0.5), ValueError, "scores", "[3]"),
            (f"{nm}-scores-2d", lambda fn=fn: fn(good, torch.rand(3, 1), 0.5), ValueError, "scores", "[3]"),
            (f"{nm}-scores-list", lambda fn=fn: fn(good, [0.1, 0.2, 0.3], 0.5), TypeError, "scores", "[3]"),
            (f"{nm}-scores-device", lambda fn=fn: fn(good, torch.empty(3, device="meta"), 0.5), ValueError, "scores", None),
        ]
    cases += [
        ("nms_mask-labels-len", lambda: nms_mask(good, scores, 0.5, torch.zeros(2, dtype=torch.long)), ValueError, "labels", "[3]"),
        ("batched-labels-len", lambda: batched_nms(good, scores, torch.zeros(4, dtype=torch.long), 0.5), ValueError, "labels", "[3]"),
        ("batched-labels-list", lambda: batched_nms(good, scores, [0, 0, 0], 0.5), TypeError, "labels", "[N]"),
        ("batched-labels-device", lambda: batched_nms(good, scores, torch.empty(3, dtype=torch.long, device="meta"), 0.5), ValueError, "labels", None),
        ("batched-scores-len", lambda: batched_nms(good, torch.rand(2), labels, 0.5), ValueError, "scores", "[3]"),
        ("batched-odd", lambda: batched_nms(odd, scores, labels, 0.5), ValueError, "boxes", shp),
        ("batched-int", lambda: batched_nms(ints, scores, labels, 0.5), TypeError, "boxes", shp),
        ("encode-gt-odd", lambda: coder.encode(odd, good), ValueError, "gt", shp),
        ("encode-anchors-other-d", lambda: coder.encode(good, other_d), ValueError, "anchors", str(2 * d)),
        ("encode-int", lambda: coder.encode(ints, good), TypeError, "gt", shp),
        ("encode-list", lambda: coder.encode(good, lst), TypeError, "anchors", shp),
        ("encode-device", lambda: coder.encode(good, meta_boxes), ValueError, "anchors", None),
        ("decode-deltas-zero", lambda: coder.decode(zero, good), ValueError, "deltas", shp),
        ("decode-deltas-int", lambda: coder.decode(ints, good), TypeError, "deltas", shp),
        ("decode-anchors-odd", lambda: coder.decode(good, odd), ValueError, "anchors", shp),
        ("decode-device", lambda: coder.decode(meta_boxes, good), ValueError, "anchors", None),
        ("coder-weights-d", lambda: BoxCoder(weights=(1.0,) * (2 * d + 2)).decode(good, good), ValueError, "weights", str(2 * d)),
        ("coder-weights-odd", lambda: BoxCoder(weights=(1.0, 2.0, 3.0)), ValueError, "weights", "2d"),
    ]
    return cases


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("case", range(len(_bad_cases(2))))
def test_bad_input_names_argument(d, case):
    cid, thunk, exc, name, hint = _bad_cases(d)[case]
    with pytest.raises(exc) as info:
        thunk()
    assert_names(info, name, hint)


# ----------------------------------------------------------------------------------------------- empty inputs


@DIMS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_inputs(d, dtype):
    e = torch.zeros(0, 2 * d, dtype=dtype)
    some = torch.tensor([[0.0] * d + [1.0] * d] * 2, dtype=dtype)
    s0 = torch.zeros(0, dtype=dtype)
    l0 = torch.zeros(0, dtype=torch.long)

    def check(t, shape, dt):
        assert t.shape == shape and t.dtype == dt, (t.shape, t.dtype)

    check(box_area(e), (0,), dtype)
    check(box_sizes(e), (0, d), dtype)
    check(box_centres(e), (0, d), dtype)
    check(box_iou(e, some), (0, 2), dtype)
    check(box_iou(some, e), (2, 0), dtype)
    check(box_iou(e, e), (0, 0), dtype)
    check(generalized_box_iou(e, some), (0, 2), dtype)
    check(generalized_box_iou(some, e), (2, 0), dtype)
    check(elementwise_box_iou(e, e), (0,), dtype)
    check(elementwise_generalized_box_iou(e, e), (0,), dtype)
    check(clip_boxes(e, (4,) * d), (0, 2 * d), dtype)
    check(remove_small_boxes(e, 1.0), (0,), torch.long)
    check(nms(e, s0, 0.5), (0,), torch.long)
    check(nms_mask(e, s0, 0.5), (0,), torch.bool)
    check(nms_mask(e, s0, 0.5, l0), (0,), torch.bool)
    check(batched_nms(e, s0, l0, 0.5), (0,), torch.long)
    for coder in (BoxCoder(), BoxCoder(weights=_weights(d, True))):
        check(coder.encode(e, e), (0, 2 * d), dtype)
        check(coder.decode(e, e), (0, 2 * d), dtype)
        check(coder.decode(torch.zeros(0, 3, 2 * d, dtype=dtype), torch.zeros(0, 1, 2 * d, dtype=dtype)), (0, 3, 2 * d), dtype)


# ----------------------------------------------------------------------------------------------- torchvision


def _distinct_scores(n: int, gen: torch.Generator, dtype) -> torch.Tensor:
    s = torch.randperm(n, generator=gen).to(dtype) / n + 1e-3  # distinct by construction: no ties
    assert s.unique().numel() == n
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_torchvision_nms_identical(dtype, thr):
    tv = pytest.importorskip("torchvision")
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 * seed + int(10 * thr))
        boxes = clustered_boxes(600, 2, gen, dtype)
        scores = _distinct_scores(600, gen, dtype)
        labels = torch.randint(0, 4, (600,), generator=gen)
        xyxy = boxes_to_xyxy(boxes)
        assert torch.equal(nms(boxes, scores, thr), tv.ops.nms(xyxy, scores, thr))
        assert torch.equal(batched_nms(boxes, scores, labels, thr), tv.ops.batched_nms(xyxy, scores, labels, thr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchvision_iou_giou_equal(dtype):
    tv = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(5)
    a = clustered_boxes(80, 2, gen, dtype, clusters=6, extent=100)
    b = clustered_boxes(70, 2, gen, dtype, clusters=6, extent=100)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else None
    torch.testing.assert_close(box_iou(a, b), tv.ops.box_iou(boxes_to_xyxy(a), boxes_to_xyxy(b)), **(tol or {}))
    torch.testing.assert_close(
        generalized_box_iou(a, b), tv.ops.generalized_box_iou(boxes_to_xyxy(a), boxes_to_xyxy(b)), **(tol or {})
    )


# ----------------------------------------------------------------------------------------------- MONAI


def test_monai_nms_3d_identical():
    bu = pytest.importorskip("monai.data.box_utils")
    # MONAI ranks by a stable descending argsort (ties: lower index first, like us) and keeps a box when its IoU with
    # the picked box is <= nms_thresh (drops when > : strict, like us). Scores are still made distinct.
    for seed, thr in [(0, 0.1), (1, 0.3), (2, 0.5)]:
        gen = torch.Generator().manual_seed(seed)
        boxes = clustered_boxes(150, 3, gen, clusters=6, extent=100)
        scores = _distinct_scores(150, gen, torch.float32)
        ours = nms(boxes, scores, thr)
        theirs = bu.non_max_suppression(boxes_to_xyzxyz(boxes), scores, thr)
        assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("d", [2, 3])
def test_monai_box_iou_equal(d):
    bu = pytest.importorskip("monai.data.box_utils")
    gen = torch.Generator().manual_seed(d)
    a = clustered_boxes(40, d, gen, clusters=5, extent=80)
    b = clustered_boxes(30, d, gen, clusters=5, extent=80)
    conv = boxes_to_xyxy if d == 2 else boxes_to_xyzxyz
    # MONAI divides by (union + eps): equal up to a relative ~1e-7 for boxes of these sizes
    torch.testing.assert_close(box_iou(a, b), bu.box_iou(conv(a), conv(b)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_nms_negative_threshold_suppresses_even_disjoint_boxes(d):
    """IoU > t holds for every pair when t < 0, so only the top box survives (as the greedy definition says)."""
    lo = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, d) * 10
    boxes = torch.cat([lo, lo + 1], dim=1)  # disjoint unit boxes
    scores = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1])
    assert nms(boxes, scores, -0.1).tolist() == [1]
    assert nms(boxes, scores, 0.0).tolist() == [1, 3, 2, 0, 4]


def test_band_chunks_cover_every_row_once_and_are_wide_enough():
    """Merged band chunks tile [0, n) in order, each at least as wide as the widest block it absorbed, and never
    larger than the cache-sized cap unless a single block already is."""
    widths = [0, 3, 5, 4, 200, 201, 2, 0, 0, 7]
    rows, n = 128, 128 * 9 + 50
    chunks = B._band_chunks(widths, rows, n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for p0, p1, w in chunks:
        blocks = range(p0 // rows, -(-p1 // rows))
        assert w == max(widths[i] for i in blocks)
        assert (p1 - p0) * w <= max(B._CHUNK_MAX, rows * w)
    assert len(chunks) < len(widths)  # narrow neighbours merge
