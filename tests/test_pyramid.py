"""The image pyramid of the one predict path (Preprocess.pyramid): validation, levels mapped back to the input grid
and merged by NMS, the LUNA16 preprocessing carrying it into the model file and the trainer's level datasets."""

import numpy as np
import pytest
import torch

from medetect.convert import Geometry
from medetect.data.image import MedicalImage
from medetect.engine.predictor import Predictor
from medetect.luna.detection import LunaPreprocess
from medetect.models.io import Preprocess


def test_pyramid_is_validated_and_round_trips():
    assert Preprocess(pyramid=[]).pyramid is None
    assert Preprocess(pyramid=[0.5, 0.25]).pyramid == [0.5, 0.25]
    assert Preprocess.from_dict(Preprocess(pyramid=[0.5]).to_dict()).pyramid == [0.5]
    assert Preprocess.from_dict({k: v for k, v in Preprocess().to_dict().items() if k != "pyramid"}).pyramid is None
    for bad in ([1.0], [0.0], [2.0]):
        with pytest.raises(ValueError, match="preprocess.pyramid"):
            Preprocess(pyramid=bad)


class _Fixed(torch.nn.Module):
    """A 'detector' that marks the same 4x4-voxel corner box on every grid; its score tells the grid's size."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"detections_per_img": 100})()

    def forward(self, images, targets=None):
        n = images.shape[-1]
        det = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": torch.tensor([n / 100.0]),
               "labels": torch.zeros(1, dtype=torch.long)}
        return {"detections": [det] * images.shape[0], "losses": {}}


def test_predict_image_runs_every_level_and_maps_boxes_back():
    img = MedicalImage(np.zeros((1, 32, 32), np.uint8), Geometry.identity(2))
    pred = Predictor(_Fixed(), device="cpu", nms_thresh=0.5, min_size=1, size_divisor=1)
    one = pred.predict_image(img, Preprocess(ndim=2, channels=1))
    assert one["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]]
    both = pred.predict_image(img, Preprocess(ndim=2, channels=1, pyramid=[0.5]))
    # the half-size level's 4-voxel box is 8 voxels of the input; IoU 0.25 < 0.5: both kept, by score
    assert both["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 8.0, 8.0]]
    assert both["scores"].tolist() == pytest.approx([0.32, 0.16])
    merged = Predictor(_Fixed(), device="cpu", nms_thresh=0.2, min_size=1, size_divisor=1).predict_image(
        img, Preprocess(ndim=2, channels=1, pyramid=[0.5]))
    assert merged["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]]  # NMS across levels keeps the stronger mark


def test_luna_preprocess_carries_the_pyramid_and_its_levels():
    pre = LunaPreprocess(spacing=1.0, pyramid=(0.25,))
    stored = pre.as_preprocess()
    assert stored.pyramid == [0.25]
    back = LunaPreprocess.from_preprocess(stored)
    assert back.pyramid == (0.25,) and LunaPreprocess.from_dict(pre.to_dict()).to_dict() == pre.to_dict()
    levels = pre.levels()
    assert [lv.target() for lv in levels] == [(1.0, 1.0, 1.0), (4.0, 4.0, 4.0)]
    assert LunaPreprocess().levels() == [LunaPreprocess()] and "pyramid" not in LunaPreprocess().to_dict()


def test_luna_config_pyramid_key():
    from medetect.config import config_from_dict

    cfg = config_from_dict({"task": "luna-detection", "preprocess": {"spacing": 1.0, "pyramid": [0.333]}})
    assert cfg.preprocess.build().pyramid == (0.333,)
    with pytest.raises(ValueError, match="preprocess.pyramid"):
        config_from_dict({"task": "luna-detection", "preprocess": {"pyramid": [1.5]}})


def test_coarser_levels_keep_only_objects_too_large_for_the_finer_ones():
    img = MedicalImage(np.zeros((1, 32, 32), np.uint8), Geometry.identity(2))
    pred = Predictor(_Fixed(), device="cpu", nms_thresh=0.5, min_size=1, size_divisor=1)
    out = pred.predict_image(img, Preprocess(ndim=2, channels=1, pyramid=[0.5], pyramid_min_size=5))
    assert out["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]]  # the half level's 4-voxel box is below 5: dropped
    with pytest.raises(ValueError, match="pyramid_min_size"):
        Preprocess(pyramid_min_size=-1)
    pre = LunaPreprocess(spacing=1.0, pyramid=(0.5,), pyramid_min_size=6.0)
    assert LunaPreprocess.from_preprocess(pre.as_preprocess()).pyramid_min_size == 6.0
