"""Boxes / circles -> Gaussian heatmaps (medetect.heatmaps): peak, symmetry, sigma, anisotropy, combination, errors."""

from __future__ import annotations

import math

import pytest
import torch

from medetect.heatmaps import box_heatmap, circle_heatmap, circle_mask, gaussian_heatmap, points_in_circles


@pytest.mark.parametrize("d", [2, 3])
def test_box_heatmap_peak_symmetry_and_sigma(d):
    n = 21
    lo, hi = [6.5] * d, [14.5] * d  # centre 10.5 = centre of voxel 10; extent 8 -> sigma 2
    h = box_heatmap(torch.tensor([lo + hi]), (n,) * d, normalise="none")
    assert h.shape == (n,) * d
    assert tuple(int(i) for i in (h == h.max()).nonzero()[0]) == (10,) * d
    assert float(h.max()) == pytest.approx(1.0)
    for a in range(d):  # symmetric about the centre along every axis
        assert torch.allclose(h, h.flip(a), atol=1e-6)
    # one voxel off the centre along axis 0: exp(-0.5 (1 / 2)^2)
    idx = (11,) + (10,) * (d - 1)
    assert float(h[idx]) == pytest.approx(math.exp(-0.5 * 0.25), rel=1e-5)


def test_normalisation_peak_and_sum():
    b = torch.tensor([[2.0, 3.0, 9.0, 12.0]])
    assert float(box_heatmap(b, (16, 16), normalise="peak").max()) == pytest.approx(1.0)
    assert float(box_heatmap(b, (16, 16), normalise="sum").sum()) == pytest.approx(1.0)


def test_several_boxes_combine_by_max():
    a, b = torch.tensor([[2.0, 2, 6, 6]]), torch.tensor([[4.0, 4, 12, 12]])
    both = box_heatmap(torch.cat([a, b]), (16, 16), normalise="none")
    assert torch.allclose(both, torch.maximum(box_heatmap(a, (16, 16), normalise="none"),
                                              box_heatmap(b, (16, 16), normalise="none")))


def test_circle_heatmap_with_anisotropic_spacing():
    # radius 4 mm -> sigma 2 mm: 2 voxels on a 1 mm axis, 1 voxel on a 2 mm axis
    h = circle_heatmap(torch.tensor([[10.5, 10.5]]), torch.tensor([4.0]), (21, 21), spacing=(2.0, 1.0),
                       normalise="none")
    assert float(h[11, 10]) == pytest.approx(math.exp(-0.5 * 1.0), rel=1e-5)  # 1 voxel on the 2 mm axis = 1 sigma
    assert float(h[10, 11]) == pytest.approx(math.exp(-0.5 * 0.25), rel=1e-5)  # 1 voxel on the 1 mm axis = sigma / 2
    ref = gaussian_heatmap(torch.tensor([[10.5, 10.5]]), torch.tensor([[1.0, 2.0]]), (21, 21), normalise="none")
    assert torch.allclose(h, ref)


def test_no_lesion_is_a_zero_map():
    assert float(box_heatmap(torch.zeros(0, 4), (8, 8)).abs().sum()) == 0
    assert float(circle_heatmap(torch.zeros(0, 3), torch.zeros(0), (4, 4, 4), normalise="sum").sum()) == 0


def test_bad_lesions_are_errors_naming_the_lesion():
    with pytest.raises(ValueError, match="box 1 .* zero size"):
        box_heatmap(torch.tensor([[0.0, 0, 4, 4], [5.0, 5, 5, 9]]), (16, 16))
    with pytest.raises(ValueError, match="box 0 .* outside the grid"):
        box_heatmap(torch.tensor([[20.0, 20, 24, 24]]), (16, 16))
    with pytest.raises(ValueError, match="lesion 0 has radius 0"):
        circle_heatmap(torch.tensor([[4.0, 4.0]]), torch.tensor([0.0]), (8, 8))
    with pytest.raises(ValueError, match="outside the grid"):
        circle_heatmap(torch.tensor([[4.0, 40.0]]), torch.tensor([2.0]), (8, 8))
    with pytest.raises(ValueError, match="shape must be 2"):
        box_heatmap(torch.tensor([[0.0, 0, 4, 4]]), (8, 8, 8))
    with pytest.raises(ValueError, match="normalise"):
        box_heatmap(torch.tensor([[0.0, 0, 4, 4]]), (8, 8), normalise="max")
    # a box partly outside is cut by the border, not an error; its Gaussian keeps its true centre
    h = box_heatmap(torch.tensor([[-6.0, -6, 4, 4]]), (8, 8), normalise="none")
    assert float(h[0, 0]) == pytest.approx(math.exp(-0.5 * 2 * (1.5 / 2.5) ** 2), rel=1e-5)


@pytest.mark.parametrize("d", [2, 3])
def test_circle_mask_and_points_in_circles(d):
    c, r = torch.tensor([[5.0] * d]), torch.tensor([2.0])
    m = circle_mask(c, r, (10,) * d)
    assert m.shape == (1,) + (10,) * d
    assert bool(m[(0,) + (4,) * d]) and not bool(m[(0,) + (0,) * d])
    pts = torch.tensor([[5.0] * d, [7.0] + [5.0] * (d - 1), [7.5] + [5.0] * (d - 1)])
    assert points_in_circles(pts, c, r)[:, 0].tolist() == [True, True, False]  # on the circle counts as inside
