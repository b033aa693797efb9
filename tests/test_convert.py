"""Tests for medetect.convert: box conventions, voxel <-> world (checked against SimpleITK), LUNA16 boxes."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from medetect.convert import (
    Geometry,
    boxes_to_luna,
    boxes_to_xywh,
    boxes_to_xyxy,
    boxes_to_xyzxyz,
    luna_to_boxes,
    reverse_axes,
    voxel_to_world,
    world_to_voxel,
    xywh_to_boxes,
    xyxy_to_boxes,
    xyzxyz_to_boxes,
)

DIMS = pytest.mark.parametrize("d", [2, 3])


def random_geometry(d: int, rng: np.random.Generator, flip: bool = True) -> Geometry:
    """Anisotropic spacing, a random rotation, optionally an axis flip (a reflection: det -1)."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    q = q * np.sign(np.diag(r))[None, :]  # a proper random orthogonal matrix
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    if flip:
        q = q @ np.diag([-1.0] + [1.0] * (d - 1))
    spacing = tuple(rng.uniform(0.3, 3.0, size=d))
    origin = tuple(rng.uniform(-300, 300, size=d))
    return Geometry(spacing, origin, tuple(q.reshape(-1)))


def assert_names(exc_info, name: str, hint: str | None = None) -> None:
    msg = str(exc_info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg), f"{name!r} not named in: {msg}"
    if hint is not None:
        assert hint in msg, f"{hint!r} not in: {msg}"


# ----------------------------------------------------------------------------------------------- box conventions


def test_xyxy_hand():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # (y0, x0, y1, x1)
    assert boxes_to_xyxy(boxes).tolist() == [[2.0, 1.0, 4.0, 3.0]]
    assert xyxy_to_boxes(torch.tensor([[2.0, 1.0, 4.0, 3.0]])).tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_xywh_hand():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 5.0]])  # y0=1, x0=2, y1=3, x1=5
    assert boxes_to_xywh(boxes).tolist() == [[2.0, 1.0, 3.0, 2.0]]  # x0, y0, w, h
    assert xywh_to_boxes(torch.tensor([[2.0, 1.0, 3.0, 2.0]])).tolist() == [[1.0, 2.0, 3.0, 5.0]]


def test_xyzxyz_hand():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # (z0, y0, x0, z1, y1, x1)
    assert boxes_to_xyzxyz(boxes).tolist() == [[3.0, 2.0, 1.0, 6.0, 5.0, 4.0]]
    assert xyzxyz_to_boxes(torch.tensor([[3.0, 2.0, 1.0, 6.0, 5.0, 4.0]])).tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_reverse_axes_is_involution(d):
    t = torch.randn(5, 3, 2 * d, generator=torch.Generator().manual_seed(d))
    r = reverse_axes(t)
    assert r.shape == t.shape
    assert torch.equal(reverse_axes(r), t)
    assert torch.equal(r[..., :d], t[..., :d].flip(-1)) and torch.equal(r[..., d:], t[..., d:].flip(-1))


@DIMS
def test_round_trips_tensor_and_numpy(d):
    gen = torch.Generator().manual_seed(d)
    lo = torch.rand(7, d, generator=gen, dtype=torch.float64) * 50
    boxes = torch.cat([lo, lo + 1 + torch.rand(7, d, generator=gen, dtype=torch.float64) * 20], -1)
    if d == 2:
        pairs = [(boxes_to_xyxy, xyxy_to_boxes), (boxes_to_xywh, xywh_to_boxes)]
    else:
        pairs = [(boxes_to_xyzxyz, xyzxyz_to_boxes)]
    for fwd, back in pairs:
        torch.testing.assert_close(back(fwd(boxes)), boxes)
        out = fwd(boxes.numpy())
        assert isinstance(out, np.ndarray)  # numpy in, numpy out
        np.testing.assert_allclose(back(out), boxes.numpy())
        assert fwd(torch.zeros(0, 2 * d)).shape == (0, 2 * d)  # empty
        assert fwd(boxes[None]).shape == (1, 7, 2 * d)  # leading dims kept


def test_convention_bad_last_dim():
    for fn, name, want in [
        (boxes_to_xyxy, "boxes", "[..., 4]"),
        (xyxy_to_boxes, "xyxy", "[..., 4]"),
        (boxes_to_xywh, "boxes", "[..., 4]"),
        (xywh_to_boxes, "xywh", "[..., 4]"),
        (boxes_to_xyzxyz, "boxes", "[..., 6]"),
        (xyzxyz_to_boxes, "xyzxyz", "[..., 6]"),
    ]:
        bad = torch.zeros(2, 8 if "4" in want else 4)
        with pytest.raises(ValueError) as info:
            fn(bad)
        assert_names(info, name, want)
    for bad in (torch.zeros(2, 3), torch.zeros(2, 0)):
        with pytest.raises(ValueError) as info:
            reverse_axes(bad)
        assert_names(info, "boxes", "2d]")


# ----------------------------------------------------------------------------------------------- voxel <-> world


@DIMS
@pytest.mark.parametrize("flip", [False, True])
def test_voxel_world_round_trip(d, flip):
    rng = np.random.default_rng(10 * d + flip)
    for _ in range(5):
        g = random_geometry(d, rng, flip)
        coords = torch.as_tensor(rng.uniform(-5, 200, size=(50, d)))
        world = voxel_to_world(coords, g)
        assert world.dtype == torch.float64 and world.shape == coords.shape
        torch.testing.assert_close(world_to_voxel(world, g), coords, rtol=0, atol=1e-9)
        # and the other way
        pts = torch.as_tensor(rng.uniform(-400, 400, size=(50, d)))
        torch.testing.assert_close(voxel_to_world(world_to_voxel(pts, g), g), pts, rtol=0, atol=1e-9)
        # distances in the world are the spacing-scaled voxel distances (the direction is orthonormal)
        step = torch.zeros(d, dtype=torch.float64)
        step[0] = 1.0
        delta = voxel_to_world(coords[0] + step, g) - voxel_to_world(coords[0], g)
        assert float(delta.norm()) == pytest.approx(g.spacing[0])


@DIMS
@pytest.mark.parametrize("flip", [False, True])
def test_voxel_to_world_agrees_with_simpleitk(d, flip):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(100 + 10 * d + flip)
    for _ in range(3):
        g = random_geometry(d, rng, flip)
        img = sitk.Image([7, 6, 5][:d], sitk.sitkFloat32)  # ITK size (x, y, z): array shape (5, 6, 7)
        g.apply_to_sitk(img)
        back = Geometry.from_sitk(img)
        np.testing.assert_allclose(back.spacing, g.spacing)
        np.testing.assert_allclose(back.origin, g.origin)
        np.testing.assert_allclose(back.direction, g.direction)
        coords = rng.uniform(-2, 8, size=(20, d))
        ours = voxel_to_world(torch.as_tensor(coords), g).numpy()
        theirs = np.array(
            [img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[::-1] - 0.5)) for c in coords]
        )
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
        # and the inverse
        pts = rng.uniform(-300, 300, size=(20, d))
        ours_v = world_to_voxel(torch.as_tensor(pts), g).numpy()
        theirs_v = np.array([np.asarray(img.TransformPhysicalPointToContinuousIndex(tuple(p)))[::-1] + 0.5 for p in pts])
        np.testing.assert_allclose(ours_v, theirs_v, rtol=0, atol=1e-8)
        # integer voxel centres: index i of ITK is the centre of our voxel [i, i + 1)
        idx = (1, 2, 3)[:d]
        centre = torch.tensor([i + 0.5 for i in reversed(idx)], dtype=torch.float64)
        np.testing.assert_allclose(voxel_to_world(centre, g).numpy(), img.TransformIndexToPhysicalPoint(idx), atol=1e-9)


def test_world_to_voxel_hand_luna_like():
    # CT: array axes (z, y, x); spacing per array axis; origin (x, y, z) = centre of voxel 0
    g = Geometry(spacing=(2.5, 0.7, 0.8), origin=(-150.0, -170.0, -300.0), direction=tuple(np.eye(3).reshape(-1)))
    v = world_to_voxel(torch.tensor([[-100.0, -100.0, -250.0]], dtype=torch.float64), g)
    # z: 50 / 2.5 + 0.5, y: 70 / 0.7 + 0.5, x: 50 / 0.8 + 0.5
    torch.testing.assert_close(v, torch.tensor([[20.5, 100.5, 63.0]], dtype=torch.float64))
    # the origin is the centre of voxel 0
    torch.testing.assert_close(voxel_to_world(torch.tensor([0.5, 0.5, 0.5]), g), torch.tensor([-150.0, -170.0, -300.0], dtype=torch.float64))
    # a flipped x axis runs the other way
    gf = Geometry(g.spacing, g.origin, (-1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    torch.testing.assert_close(voxel_to_world(torch.tensor([0.5, 0.5, 1.5]), gf), torch.tensor([-150.8, -170.0, -300.0], dtype=torch.float64))
    # numpy in, numpy out
    assert isinstance(world_to_voxel(np.array([[-100.0, -100.0, -250.0]]), g), np.ndarray)


# ----------------------------------------------------------------------------------------------- LUNA16


def test_luna_to_boxes_hand():
    g = Geometry(spacing=(2.5, 0.7, 0.8), origin=(-150.0, -170.0, -300.0), direction=tuple(np.eye(3).reshape(-1)))
    boxes = luna_to_boxes(torch.tensor([[-100.0, -100.0, -250.0]]), torch.tensor([10.0]), g)
    hy = 5.0 / 0.7
    expected = torch.tensor([[20.5 - 2.0, 100.5 - hy, 63.0 - 6.25, 20.5 + 2.0, 100.5 + hy, 63.0 + 6.25]], dtype=torch.float64)
    torch.testing.assert_close(boxes, expected)


@DIMS
@pytest.mark.parametrize("flip", [False, True])
def test_luna_round_trip(d, flip):
    rng = np.random.default_rng(7 + d + flip)
    g = random_geometry(d, rng, flip)
    centres = rng.uniform(-200, 200, size=(12, d))
    dia = rng.uniform(3, 30, size=12)
    boxes = luna_to_boxes(centres, dia, g)  # numpy in
    assert isinstance(boxes, np.ndarray) and boxes.shape == (12, 2 * d)
    # extents in mm equal the diameter on every axis
    np.testing.assert_allclose((boxes[:, d:] - boxes[:, :d]) * np.asarray(g.spacing), np.repeat(dia[:, None], d, 1))
    c2, dia2 = boxes_to_luna(boxes, g)
    np.testing.assert_allclose(c2, centres, atol=1e-9)
    np.testing.assert_allclose(dia2, dia, atol=1e-9)
    # torch in, torch out
    c3, dia3 = boxes_to_luna(torch.as_tensor(boxes), g)
    assert isinstance(c3, torch.Tensor) and isinstance(dia3, torch.Tensor)
    # empty
    e = luna_to_boxes(np.zeros((0, d)), np.zeros(0), g)
    assert e.shape == (0, 2 * d)
    ce, de = boxes_to_luna(e, g)
    assert ce.shape == (0, d) and de.shape == (0,)


# ----------------------------------------------------------------------------------------------- validation


def test_geometry_validation():
    eye3 = tuple(np.eye(3).reshape(-1))
    bad = [
        (dict(spacing=(), origin=(), direction=()), "spacing"),
        (dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0), direction=eye3), "origin"),
        (dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=eye3[:4]), "direction"),
        (dict(spacing=(1.0, 0.0, 1.0), origin=(0.0, 0.0, 0.0), direction=eye3), "spacing"),
        (dict(spacing=(1.0, -1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=eye3), "spacing"),
        (dict(spacing=(1.0, math.inf, 1.0), origin=(0.0, 0.0, 0.0), direction=eye3), "spacing"),
        (dict(spacing=(1.0, math.nan, 1.0), origin=(0.0, 0.0, 0.0), direction=eye3), "spacing"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError) as info:
            Geometry(**kwargs)
        assert_names(info, f"Geometry.{name}")
    g = Geometry.identity(3, spacing=(2.0, 1.0, 0.5))
    assert g.ndim == 3 and g.origin == (0.0, 0.0, 0.0) and g.direction == eye3
    assert all(isinstance(v, float) for v in g.spacing + g.origin + g.direction)
    # the matrix is direction times ITK-order spacing
    np.testing.assert_allclose(g.matrix(), np.diag([0.5, 1.0, 2.0]))


@DIMS
def test_convert_bad_input(d):
    g = Geometry.identity(d)
    for fn, arg, name in [
        (voxel_to_world, torch.zeros(3, d + 1), "coords"),
        (world_to_voxel, torch.zeros(3, d + 1), "points"),
        (boxes_to_luna, torch.zeros(3, 2 * d + 1), "boxes"),
    ]:
        with pytest.raises(ValueError) as info:
            fn(arg, g)
        assert_names(info, name)
    with pytest.raises(ValueError) as info:
        voxel_to_world(torch.tensor(1.0), g)
    assert_names(info, "coords")
    with pytest.raises(ValueError) as info:
        luna_to_boxes(torch.zeros(3, d), torch.zeros(2), g)
    assert_names(info, "diameters", "(3,)")
    with pytest.raises(ValueError) as info:
        luna_to_boxes(torch.zeros(3, d + 1), torch.zeros(3), g)
    assert_names(info, "centres")
