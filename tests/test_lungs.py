"""The lung mask of whole chest CTs (medetect.luna.lungs) on a synthetic chest: lungs in, outside air and body out,
a tumour on the chest wall in; crops of lung tissue refused; marks filtered in world mm."""

import numpy as np
import pytest

from medetect.convert import Geometry, voxel_to_world
from medetect.luna.lungs import lung_mask, marks_in_lungs


def _chest(tumour=True):
    z, y, x = np.mgrid[:20, :128, :128].astype(float)
    vol = np.full((20, 128, 128), -1000.0)
    body = ((y - 64) / 56) ** 2 + ((x - 64) / 60) ** 2 < 1
    vol[body] = 40
    for cx in (30, 98):  # two lungs 40 mm apart (the mediastinum between them)
        lung = ((y - 64) / 40) ** 2 + ((x - cx) / 14) ** 2 < 1
        vol[lung] = -850
    if tumour:  # a soft-tissue mass on the lateral wall of the left lung
        vol[((y - 64) ** 2 + (x - 16) ** 2 < 64) & (z > 5) & (z < 15)] = 30
    return vol.astype(np.int16)


def test_lungs_in_outside_air_and_body_out_wall_tumour_in():
    vol = _chest()
    mask, steps = lung_mask(vol, (2.5, 1.0, 1.0), grid_mm=2.0)
    assert steps == (2, 2) and mask.shape == (20, 64, 64)
    g = Geometry((2.5, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    pts = np.array([[10, 64, 30], [10, 64, 98], [10, 64, 20], [10, 4, 4], [10, 64, 64], [10, 120, 64]], float) + 0.5
    world = np.asarray(voxel_to_world(pts, g))
    inside = marks_in_lungs(mask, steps, g, world)
    assert inside.tolist() == [True, True, True, False, False, False]  # lungs, wall tumour | outside air, mediastinum, body
    assert marks_in_lungs(mask, steps, g, np.zeros((0, 3))).shape == (0,)


def test_a_crop_of_lung_tissue_is_refused():
    crop = np.full((16, 32, 32), -850, np.int16)  # lung air touching every border: no body around it
    with pytest.raises(ValueError, match="not a whole chest CT"):
        lung_mask(crop, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="no air"):
        lung_mask(np.zeros((4, 16, 16), np.int16), (1.0, 1.0, 1.0))
