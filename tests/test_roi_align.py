"""Tests for medetect.layers.roi_align: RoIAlign / RoIPool in 2D and 3D.

The references below are slow, explicit loops (per RoI, per bin, per sample point, per interpolation corner)
that follow torchvision's CPU kernels step by step, written for any d with itertools.product. The
vectorised ops are compared against them on random cases, plus analytic cases, gradcheck, errors, and a
torchvision cross-check (skipped where torchvision does not import).
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medetect.layers import RoIAlign, RoIPool, roi_align, roi_pool

# ----------------------------------------------------------------------------------------------------------
# Loop references (float64 Python arithmetic on tensors of the input dtype where rounding matters).
# ----------------------------------------------------------------------------------------------------------


def _interp(fmap: torch.Tensor, coords: list[float]) -> torch.Tensor:
    """torchvision's bilinear_interpolate generalised to d dims; fmap [C, *spatial] -> [C]."""
    sizes = fmap.shape[1:]
    if any(c < -1.0 or c > n for c, n in zip(coords, sizes)):
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    los, his, fracs = [], [], []
    for c, n in zip(coords, sizes):
        c = max(c, 0.0)
        lo = int(c)
        if lo >= n - 1:
            lo = hi = n - 1
            c = float(lo)
        else:
            hi = lo + 1
        los.append(lo)
        his.append(hi)
        fracs.append(c - lo)
    val = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    for corner in itertools.product((0, 1), repeat=len(sizes)):
        w = 1.0
        idx = []
        for a, bit in enumerate(corner):
            w *= fracs[a] if bit else 1.0 - fracs[a]
            idx.append(his[a] if bit else los[a])
        val = val + w * fmap[(slice(None), *idx)]
    return val


def ref_roi_align(features, rois, output_size, spatial_scale=1.0, sampling_ratio=2, aligned=True):
    d = features.dim() - 2
    out = (output_size,) * d if isinstance(output_size, int) else tuple(output_size)
    K, C = rois.shape[0], features.shape[1]
    result = torch.zeros((K, C, *out), dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for k in range(K):
        r = rois[k].tolist()
        fmap = features[int(r[0])]
        start = [r[1 + a] * spatial_scale - offset for a in range(d)]
        end = [r[1 + d + a] * spatial_scale - offset for a in range(d)]
        size = [e - s for s, e in zip(start, end)]
        if not aligned:
            size = [max(s, 1.0) for s in size]
        binsz = [size[a] / out[a] for a in range(d)]
        grid = [sampling_ratio if sampling_ratio > 0 else math.ceil(size[a] / out[a]) for a in range(d)]
        count = max(math.prod(grid), 1)
        for pbin in itertools.product(*(range(o) for o in out)):
            acc = torch.zeros(C, dtype=features.dtype)
            for samp in itertools.product(*(range(max(g, 0)) for g in grid)):
                coords = [
                    start[a] + pbin[a] * binsz[a] + (samp[a] + 0.5) * binsz[a] / grid[a] for a in range(d)
                ]
                acc = acc + _interp(fmap, coords)
            result[(k, slice(None), *pbin)] = acc / count
    return result


def _c_round(x: float) -> int:
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def ref_roi_pool(features, rois, output_size, spatial_scale=1.0):
    """torchvision roi_pool loop (strict > scan from -FLT_MAX, empty bins 0); returns (out, argmax)."""
    d = features.dim() - 2
    out = (output_size,) * d if isinstance(output_size, int) else tuple(output_size)
    K, C = rois.shape[0], features.shape[1]
    sizes = features.shape[2:]
    result = torch.zeros((K, C, *out), dtype=features.dtype)
    argmax = torch.full((K, C, *out), -1, dtype=torch.long)  # flat index into features[b, c]
    neg = -torch.finfo(torch.float32).max
    dt = features.dtype  # torchvision does this arithmetic in the input dtype T

    def scalar(x):
        return torch.tensor(x, dtype=dt)

    for k in range(K):
        b = int(rois[k, 0])
        r = (rois[k].to(dt) * spatial_scale).tolist()
        start = [_c_round(r[1 + a]) for a in range(d)]
        end = [_c_round(r[1 + d + a]) for a in range(d)]
        length = [max(e - s + 1, 1) for s, e in zip(start, end)]
        binsz = [scalar(length[a]) / out[a] for a in range(d)]
        for pbin in itertools.product(*(range(o) for o in out)):
            lo = [math.floor(scalar(pbin[a]) * binsz[a]) + start[a] for a in range(d)]
            hi = [math.ceil(scalar(pbin[a] + 1) * binsz[a]) + start[a] for a in range(d)]
            lo = [min(max(v, 0), n) for v, n in zip(lo, sizes)]
            hi = [min(max(v, 0), n) for v, n in zip(hi, sizes)]
            empty = any(h <= l for l, h in zip(lo, hi))
            for c in range(C):
                best, arg = (0.0 if empty else neg), -1
                for pos in itertools.product(*(range(l, h) for l, h in zip(lo, hi))):
                    v = features[(b, c, *pos)].item()
                    if v > best:
                        best, arg = v, sum(p * math.prod(sizes[a + 1 :]) for a, p in enumerate(pos))
                result[(k, c, *pbin)] = best
                argmax[(k, c, *pbin)] = arg
    return result, argmax


# ----------------------------------------------------------------------------------------------------------
# Random cases
# ----------------------------------------------------------------------------------------------------------


def _random_rois(gen, K, B, sizes, scale=1.0, tiny=False):
    """Boxes in input-image coords, partly crossing the border, some tiny; [K, 1 + 2d] float64."""
    d = len(sizes)
    img = torch.tensor(sizes, dtype=torch.float64) / scale
    lo = torch.rand(K, d, generator=gen, dtype=torch.float64) * (img + 6) - 4  # crosses below 0 and above N
    ext = torch.rand(K, d, generator=gen, dtype=torch.float64) * img * (0.05 if tiny else 1.0)
    if tiny:
        ext = ext.clamp(max=0.6)
    hi = lo + ext
    bidx = torch.randint(0, B, (K, 1), generator=gen).double()
    return torch.cat([bidx, lo, hi], 1)


CASES_2D = [(2, 3, (9, 11), (3, 2)), (3, 2, (6, 5), 2)]
CASES_3D = [(2, 2, (5, 6, 7), (2, 3, 2)), (1, 3, (4, 4, 6), 2)]


@pytest.mark.parametrize("case", CASES_2D + CASES_3D)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_align_matches_loop_reference(case, aligned, scale):
    B, C, sizes, out = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((sizes, aligned, scale)).encode()))
    feats = torch.randn(B, C, *sizes, generator=gen, dtype=torch.float64)
    rois = torch.cat(
        [_random_rois(gen, 5, B, sizes, scale), _random_rois(gen, 3, B, sizes, scale, tiny=True)]
    )
    for sr in (2, 1, 3):
        got = roi_align(feats, rois, out, spatial_scale=scale, sampling_ratio=sr, aligned=aligned)
        ref = ref_roi_align(feats, rois, out, spatial_scale=scale, sampling_ratio=sr, aligned=aligned)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES_2D[0], CASES_3D[1]])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_adaptive_sampling(case, aligned):
    B, C, sizes, out = case
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(B, C, *sizes, generator=gen, dtype=torch.float64)
    rois = torch.cat([_random_rois(gen, 5, B, sizes), _random_rois(gen, 3, B, sizes, tiny=True)])
    # A degenerate box (zero size): adaptive grid 0 with aligned=True -> output 0.
    rois = torch.cat([rois, torch.tensor([[0.0] + [2.0] * (2 * len(sizes))], dtype=torch.float64)])
    got = roi_align(feats, rois, out, sampling_ratio=0, aligned=aligned)
    ref = ref_roi_align(feats, rois, out, sampling_ratio=0, aligned=aligned)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES_2D + CASES_3D)
@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # general and packed-key paths
def test_roi_pool_matches_loop_reference(case, scale, dtype):
    B, C, sizes, out = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((sizes, scale, "pool")).encode()))
    feats = torch.randn(B, C, *sizes, generator=gen, dtype=torch.float64).to(dtype)
    rois = torch.cat(
        [_random_rois(gen, 5, B, sizes, scale), _random_rois(gen, 3, B, sizes, scale, tiny=True)]
    )
    # Exact .5 corners exercise C rounding (half away from zero).
    halves = torch.tensor([[0.0] + [0.5] * len(sizes) + [2.5] * len(sizes)], dtype=torch.float64)
    rois = torch.cat([rois, halves])
    got = roi_pool(feats, rois, out, spatial_scale=scale)
    ref, _ = ref_roi_pool(feats, rois, out, spatial_scale=scale)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 3),
    data=st.data(),
)
def test_property_random_shapes(d, data):
    sizes = tuple(data.draw(st.lists(st.integers(1, 6), min_size=d, max_size=d)))
    out = tuple(data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    seed = data.draw(st.integers(0, 2**16))
    aligned = data.draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 2, *sizes, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 3, 2, sizes)
    torch.testing.assert_close(
        roi_align(feats, rois, out, aligned=aligned), ref_roi_align(feats, rois, out, aligned=aligned)
    )
    torch.testing.assert_close(roi_pool(feats, rois, out), ref_roi_pool(feats, rois, out)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Analytic cases
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(12, 14), (8, 9, 10)])
def test_roi_align_linear_ramp_equals_bin_centre(sizes):
    """A ramp whose value at voxel i is its centre i + 0.5: RoIAlign gives the ramp at each bin centre."""
    d = len(sizes)
    coef = torch.tensor([1.5, -2.0, 0.75][:d], dtype=torch.float64)
    centres = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) + 0.5 for n in sizes), indexing="ij")
    ramp = sum(c * g for c, g in zip(coef, centres)) + 3.0  # [*sizes]
    feats = ramp[None, None]
    out = (3,) * d
    lo = torch.tensor([1.2, 2.0, 1.7][:d], dtype=torch.float64)
    hi = torch.tensor([6.3, 5.5, 7.9][:d], dtype=torch.float64)  # all samples within [0.5, N - 0.5]
    rois = torch.cat([torch.zeros(1, dtype=torch.float64), lo, hi])[None]
    got = roi_align(feats, rois, out, sampling_ratio=3)[0, 0]
    steps = torch.arange(3, dtype=torch.float64) + 0.5
    bin_centres = [lo[a] + steps * (hi[a] - lo[a]) / 3 for a in range(d)]
    expected = sum(c * g for c, g in zip(coef, torch.meshgrid(*bin_centres, indexing="ij"))) + 3.0
    torch.testing.assert_close(got, expected)


def test_roi_align_constant_map_and_outside_box():
    feats = torch.full((1, 2, 10, 10, 10), 4.0)
    inside = torch.tensor([[0.0, 1, 1, 1, 9, 8, 7]])
    torch.testing.assert_close(roi_align(feats, inside, 2), torch.full((1, 2, 2, 2, 2), 4.0))
    far = torch.tensor([[0.0, 20, 20, 20, 30, 30, 30]])  # every sample beyond N -> 0
    torch.testing.assert_close(roi_align(feats, far, 2), torch.zeros(1, 2, 2, 2, 2))


def test_roi_pool_hand_case():
    feats = torch.arange(16.0).view(1, 1, 4, 4)  # value = 4*y + x
    rois = torch.tensor([[0.0, 0, 0, 3, 3], [0.0, 1, 2, 2, 3]])  # inclusive pixel boxes
    got = roi_pool(feats, rois, 2)
    torch.testing.assert_close(got[0, 0], torch.tensor([[5.0, 7.0], [13.0, 15.0]]))
    torch.testing.assert_close(got[1, 0], torch.tensor([[6.0, 7.0], [10.0, 11.0]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_roi_pool_ties_nan_and_gradient_routing(dtype):
    feats = torch.zeros(1, 1, 3, 4, dtype=dtype)
    feats[0, 0, 0, 0] = -0.0  # -0.0 and +0.0 tie: the first in raster order wins
    feats[0, 0, 1, 1] = float("nan")
    feats[0, 0, 2, 3] = float("-inf")
    feats[0, 0, 0, 3] = -3.0
    feats[0, 0, 1, 3] = -3.0
    feats.requires_grad_(True)
    rois = torch.tensor(
        [[0.0, 0, 0, 2, 3], [0.0, 2, 3, 2, 3], [0.0, 1, 1, 1, 1], [0.0, 0, 3, 1, 3]], dtype=torch.float64
    )
    got = roi_pool(feats, rois, 1)
    ref, arg = ref_roi_pool(feats.detach(), rois, 1)
    # tie of zeros; -inf alone and NaN alone -> -FLT_MAX (as torchvision); tie of -3.0
    torch.testing.assert_close(got, ref.to(dtype), rtol=0, atol=0)
    assert arg.view(-1).tolist() == [0, -1, -1, 3]
    got.float().sum().backward()
    expected = torch.zeros(12, dtype=dtype)
    expected[0] = 1.0
    expected[3] = 1.0
    torch.testing.assert_close(feats.grad.view(-1), expected)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(5, 6), (3, 4, 5)])
def test_roi_align_gradcheck(sizes):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 2, *sizes, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(gen, 3, 2, sizes)
    # Full Jacobian in 2D; fast mode (random projections) keeps the 3D case quick.
    fast = len(sizes) == 3
    assert torch.autograd.gradcheck(
        lambda f: roi_align(f, rois, 2, sampling_ratio=2), (feats,), fast_mode=fast
    )


@pytest.mark.parametrize("sizes", [(5, 6), (3, 4, 5)])
def test_roi_pool_gradient_goes_to_argmax(sizes):
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 2, *sizes, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(gen, 4, 2, sizes)
    got = roi_pool(feats, rois, 2)
    upstream = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    (got * upstream).sum().backward()
    _, arg = ref_roi_pool(feats.detach(), rois, 2)
    expected = torch.zeros(2, 2, math.prod(sizes), dtype=torch.float64)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        for c in range(2):
            for a, g in zip(arg[k, c].reshape(-1).tolist(), upstream[k, c].reshape(-1).tolist()):
                if a >= 0:
                    expected[b, c, a] += g
    torch.testing.assert_close(feats.grad.view(2, 2, -1), expected)
    assert torch.autograd.gradcheck(
        lambda f: roi_pool(f, rois, 2), (feats.detach().requires_grad_(),), fast_mode=True
    )


def test_no_gradient_to_rois_and_layout_independence():
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 3, 6, 7, 8, generator=gen)
    rois = _random_rois(gen, 4, 2, (6, 7, 8)).float().requires_grad_(True)
    out = roi_align(feats, rois, 2)
    assert not out.requires_grad
    cl = feats.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(roi_align(cl, rois, 2), out)
    torch.testing.assert_close(roi_pool(cl, rois, 2), roi_pool(feats, rois, 2))


# ----------------------------------------------------------------------------------------------------------
# Edge cases and errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [roi_align, roi_pool])
@pytest.mark.parametrize("sizes", [(5, 6), (3, 4, 5)])
def test_empty_rois(fn, sizes):
    d = len(sizes)
    feats = torch.randn(2, 3, *sizes, requires_grad=True)
    out = fn(feats, torch.zeros(0, 1 + 2 * d), (2,) * d)
    assert out.shape == (0, 3, *(2,) * d)
    out.sum().backward()  # stays connected to the graph
    assert feats.grad is not None and not feats.grad.any()


def test_modules():
    feats = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0.0, 1, 1, 6, 5]])
    ra = RoIAlign((2, 3), spatial_scale=0.5, sampling_ratio=1, aligned=False)
    rp = RoIPool([2, 3], spatial_scale=0.5)
    torch.testing.assert_close(ra(feats, rois), roi_align(feats, rois, (2, 3), 0.5, 1, False))
    torch.testing.assert_close(rp(feats, rois), roi_pool(feats, rois, (2, 3), 0.5))
    assert "sampling_ratio=1" in repr(ra) and "output_size=(2, 3)" in repr(rp)


@pytest.mark.parametrize("fn", [roi_align, roi_pool])
def test_bad_inputs(fn):
    feats = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0.0, 0, 0, 2, 2]])
    with pytest.raises(ValueError, match=r"rois must be \[K, 5\]"):
        fn(feats, torch.zeros(3, 7), 2)  # 3D-style rois on a 2D map
    with pytest.raises(ValueError, match="rois must be"):
        fn(feats, torch.zeros(5), 2)
    with pytest.raises(ValueError, match="features must be"):
        fn(torch.randn(2, 5), rois, 2)
    with pytest.raises(TypeError, match="features must have a floating dtype"):
        fn(torch.ones(1, 2, 5, 5, dtype=torch.int64), rois, 2)
    with pytest.raises(TypeError, match="rois must have a floating dtype"):
        fn(feats, rois.long(), 2)
    with pytest.raises(TypeError, match="features must be a Tensor"):
        fn(feats.numpy(), rois, 2)
    with pytest.raises(ValueError, match="output_size"):
        fn(feats, rois, (2, 2, 2))
    with pytest.raises(ValueError, match="output_size"):
        fn(feats, rois, 0)
    with pytest.raises(ValueError, match="rois is on meta"):
        fn(feats, rois.to("meta"), 2)


# ----------------------------------------------------------------------------------------------------------
# torchvision cross-check (2D)
# ----------------------------------------------------------------------------------------------------------


def _to_xyxy(rois: torch.Tensor) -> torch.Tensor:
    """(b, y0, x0, y1, x1) -> torchvision's (b, x0, y0, x1, y1)."""
    return rois[:, [0, 2, 1, 4, 3]]


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0, 1])
def test_torchvision_roi_align(aligned, sampling_ratio):
    tv_ops = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(11)
    sizes = (13, 17)
    feats = torch.randn(3, 4, *sizes, generator=gen)
    rois = torch.cat(
        [_random_rois(gen, 40, 3, sizes, 0.3), _random_rois(gen, 10, 3, sizes, 0.3, tiny=True)]
    )
    rois = rois.float()
    f1 = feats.clone().requires_grad_(True)
    f2 = feats.clone().requires_grad_(True)
    ours = roi_align(f1, rois, (7, 5), 0.3, sampling_ratio, aligned)
    theirs = tv_ops.roi_align(f2, _to_xyxy(rois), (7, 5), 0.3, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    g = torch.randn(ours.shape, generator=gen)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-4)


def test_torchvision_roi_pool():
    tv_ops = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(12)
    sizes = (13, 17)
    feats = torch.randn(3, 4, *sizes, generator=gen)
    rois = torch.cat(
        [_random_rois(gen, 40, 3, sizes, 0.3), _random_rois(gen, 10, 3, sizes, 0.3, tiny=True)]
    )
    rois = rois.float()
    f1 = feats.clone().requires_grad_(True)
    f2 = feats.clone().requires_grad_(True)
    ours = roi_pool(f1, rois, (7, 5), 0.3)
    theirs = tv_ops.roi_pool(f2, _to_xyxy(rois), (7, 5), 0.3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    g = torch.randn(ours.shape, generator=gen)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-5, atol=1e-5)


def test_roi_align_border_rule():
    """torchvision's rule: a sample at y in [-1, 0] reads row 0, in [N-1, N] row N-1, beyond it is 0."""
    feats = torch.arange(1.0, 5.0).view(1, 1, 4, 1).expand(1, 1, 4, 3).contiguous()  # row y has value y + 1
    # aligned=False, sampling 1, one bin: the single sample sits at the box centre (in feature coords).
    centres = [-1.1, -1.0, -0.4, 0.0, 3.0, 3.6, 4.0, 4.1]
    rois = torch.tensor([[0.0, c - 0.5, 1.0, c + 0.5, 2.0] for c in centres])
    got = roi_align(feats, rois, 1, sampling_ratio=1, aligned=False).view(-1)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 1.0, 1.0, 4.0, 4.0, 4.0, 0.0]))


def test_per_axis_spatial_scale_equals_prescaled_rois():
    """A per-axis ``spatial_scale`` (anisotropic strides) equals scaling the boxes first with scale 1."""
    from medetect.layers.roi_align import roi_align as ra, roi_pool as rp

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 3, 6, 10, 12, generator=g)
    rois = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 15.0, 20.0], [0.0, 0.0, 0.0, 0.0, 12.0, 40.0, 48.0]])
    scale = (0.5, 0.25, 0.25)
    pre = rois.clone()
    pre[:, 1:] = pre[:, 1:] * torch.tensor(scale * 2)
    assert torch.allclose(ra(feats, rois, (2, 3, 3), spatial_scale=scale), ra(feats, pre, (2, 3, 3)), atol=1e-6)
    assert torch.equal(rp(feats, rois, (2, 2, 2), spatial_scale=scale), rp(feats, pre, (2, 2, 2)))
    with pytest.raises(ValueError, match="spatial_scale"):
        ra(feats, rois, 2, spatial_scale=(0.5, 0.5))
