"""Canonical orientation (medetect.data.orientation): every axis-aligned layout of one physical image, 2D and 3D,
comes out as the same canonical array with an identity direction, voxel by voxel at the same world points, and
boxes map back to the input grid onto the same world boxes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medetect.convert import Geometry, voxel_to_world
from medetect.data.image import MedicalImage
from medetect.data.orientation import canonical_orientation, to_canonical
from medetect.organs.data import world_box


def _layouts(d):
    for perm in itertools.permutations(range(d)):
        for signs in itertools.product([1, -1], repeat=d):
            D = np.zeros((d, d))
            for a, w in enumerate(perm):
                D[w, a] = signs[a]
            yield D


def _world_values(img):
    shape = img.array.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, len(shape))
    w = np.asarray(voxel_to_world(idx + 0.5, img.geometry))  # voxel centres (edge coordinates + 0.5)
    return {tuple(np.round(p, 4)): int(v) for p, v in zip(w, img.array[0].reshape(-1))}


@pytest.mark.parametrize("d", [2, 3])
def test_every_axis_aligned_layout_reorients_to_the_same_physical_image(d):
    rng = np.random.default_rng(d)
    for D in _layouts(d):
        shape = tuple(int(s) for s in rng.integers(3, 7, size=d))
        g = Geometry(tuple(rng.uniform(0.5, 3, d)), tuple(rng.uniform(-50, 50, d)), tuple(D.reshape(-1)))
        img = MedicalImage(rng.integers(0, 1000, size=(1, *shape)), g)
        can, ro = to_canonical(img)
        assert np.allclose(np.asarray(can.geometry.direction).reshape(d, d), np.eye(d))
        assert _world_values(can) == _world_values(img)
        assert can.array.shape[1:] == ro.out_shape
        # a box on the canonical grid and its input-grid image cover the same world box
        box = torch.tensor([[0.5, 1.0, 2.0, 2.5, 3.0, 2.75][:d] + [2.5, 3.0, 3.0, 2.5, 3.0, 2.75][:d]])
        box[:, d:] = box[:, :d] + 1.5
        back = ro.boxes_to_input(box)
        if d == 3:
            assert np.allclose(world_box(back.numpy(), g), world_box(box.numpy(), can.geometry), atol=1e-6)
        assert torch.allclose(ro.boxes_to_canonical(back), box)


def test_identity_layout_is_returned_untouched_and_obliques_pick_the_nearest_axes():
    g = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    img = MedicalImage(np.zeros((1, 4, 5, 6), dtype=np.int16), g)
    can, ro = to_canonical(img)
    assert can is img and ro.is_identity
    t = np.radians(20)  # a 20 degree tilt about x, stored with the rows reversed
    D = np.array([[1, 0, 0], [0, -np.cos(t), -np.sin(t)], [0, -np.sin(t), np.cos(t)]])
    ro = canonical_orientation(Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(D.reshape(-1))), (4, 5, 6))
    assert ro.perm == (0, 1, 2) and ro.flip == (False, True, False)
