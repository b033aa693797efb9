"""train.init_backbone: a detector's backbone started from a pretrained patch classifier (the localizer's trunk) or
another detector's backbone, by name and shape; a file with nothing that fits is refused, naming the key."""

import pytest
import torch

from medetect.detection.train import init_backbone
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, save_model
from medetect.models.localizer import LocalizerConfig, build_localizer


def _detector(width=8):
    return build_detector(DetectorConfig(ndim=2, in_channels=1, num_classes=2, base_width=width, fpn_channels=8,
                                         roi_hidden=16, levels=[2, 3], anchor_sizes=[[8], [16]]))


def test_localizer_trunk_initialises_the_detector_backbone(tmp_path):
    torch.manual_seed(0)
    loc = build_localizer(LocalizerConfig(ndim=2, in_channels=1, num_classes=2, base_width=8, norm="group", window=32,
                                          hidden=8))
    f = tmp_path / "patches.safetensors"
    save_model(loc, f, kind="localizer", preprocess=Preprocess(ndim=2, channels=1), classes=["b", "m"], fp16=False)
    det = _detector()
    n = init_backbone(det, f)
    src = loc.state_dict()
    assert n == len([k for k in src if k.startswith("trunk.body.")])  # every trunk tensor (stem + c2..c4) fits
    got = det.state_dict()
    for k, v in src.items():
        if k.startswith("trunk.body."):
            torch.testing.assert_close(got["features.body." + k[len("trunk.body."):]], v)


def test_a_file_without_matching_tensors_is_refused(tmp_path):
    other = _detector(width=16)
    f = tmp_path / "wide.safetensors"
    save_model(other, f, kind="detector", preprocess=Preprocess(ndim=2, channels=1), classes=["b", "m"], fp16=False)
    n = init_backbone(_detector(width=16), f)
    assert n > 0
    with pytest.raises(ValueError, match="train.init_backbone"):
        init_backbone(_detector(width=8), f)
    (tmp_path / "x.pt").write_bytes(b"\x80\x02pickle")
    with pytest.raises(ValueError):
        init_backbone(_detector(), tmp_path / "x.pt")
