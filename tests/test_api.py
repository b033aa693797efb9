"""The top-level API: ``medetect.load_model`` and ``medetect.Predictor`` (imported lazily), and
``Predictor.predict_image`` on a MedicalImage, a numpy array (2D grey, 2D colour, 3D) or a path, all giving the same
boxes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medetect
from medetect.convert import Geometry
from medetect.data.image import MedicalImage
from medetect.data.io import read_image, write_image
from medetect.engine.predictor import Predictor
from medetect.models.detector import build_detector
from medetect.models.io import Preprocess

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_detector_config  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BCCD_WEIGHTS = ROOT / "medetect" / "weights" / "bccd_faster_rcnn.safetensors"
BCCD_IMAGE = ROOT / "medetect" / "assets" / "bccd" / "BloodImage_00000.jpg"


def _tiny(d: int, channels: int = 1) -> tuple[Predictor, Preprocess]:
    """An untrained tiny detector that reports every box it finds (score_thresh 0): enough boxes to compare."""
    torch.manual_seed(0)
    model = build_detector(tiny_detector_config(d=d, in_channels=channels, score_thresh=0.0, detections_per_img=1000))
    pre = Preprocess(ndim=d, channels=channels, mean=[0.5] * channels, std=[0.25] * channels)
    return Predictor(model, device="cpu", min_size=32), pre


def _same(a: dict, b: dict) -> None:
    assert len(a["boxes"]) > 0  # a comparison of two empty results would prove nothing
    for k in ("boxes", "scores", "labels", "centres_world", "extent_mm"):
        torch.testing.assert_close(a[k], b[k])


def _picture(shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 60, shape, dtype=np.uint8)
    a[(slice(4, 14), slice(6, 20))] = 230  # a bright block in the first two axes
    return a


def test_2d_grey_array_same_boxes_as_medical_image():
    predictor, pre = _tiny(2)
    a = _picture((40, 48))
    ref = predictor.predict_image(MedicalImage(a[None], Geometry.identity(2)), pre)
    _same(predictor.predict_image(a, pre), ref)
    assert predictor.predict_image(a[:, :, None], pre)["boxes"].shape == ref["boxes"].shape  # H x W x 1: grey too


def test_2d_colour_array_same_boxes_as_medical_image_and_alpha_dropped():
    predictor, pre = _tiny(2, channels=3)
    rgb = _picture((40, 48, 3))
    ref = predictor.predict_image(MedicalImage(np.moveaxis(rgb, -1, 0).copy(), Geometry.identity(2)), pre)
    _same(predictor.predict_image(rgb, pre), ref)
    rgba = np.concatenate([rgb, np.full((40, 48, 1), 255, np.uint8)], -1)  # the image readers drop alpha: so do we
    _same(predictor.predict_image(rgba, pre), ref)


def test_3d_array_same_boxes_as_medical_image_with_spacing_and_origin():
    predictor, pre = _tiny(3)
    v = _picture((16, 24, 20))
    geo = Geometry((2.0, 0.5, 0.75), (10.0, -4.0, 30.0), tuple(np.eye(3).reshape(-1)))
    ref = predictor.predict_image(MedicalImage(v[None], geo), pre)
    got = predictor.predict_image(v, pre, spacing=(2.0, 0.5, 0.75), origin=(10.0, -4.0, 30.0))
    _same(got, ref)
    unit = predictor.predict_image(v, pre)  # unit spacing, zero origin: same voxel boxes, other world positions
    torch.testing.assert_close(unit["boxes"], ref["boxes"])
    torch.testing.assert_close(unit["extent_mm"], unit["boxes"][:, 3:] - unit["boxes"][:, :3])


def test_path_same_boxes_as_medical_image(tmp_path):
    predictor, pre = _tiny(2)
    a = _picture((40, 48))
    Image.fromarray(a).save(tmp_path / "img.png")
    ref = predictor.predict_image(read_image(tmp_path / "img.png"), pre)
    _same(predictor.predict_image(tmp_path / "img.png", pre), ref)
    _same(predictor.predict_image(str(tmp_path / "img.png"), pre), ref)
    predictor3, pre3 = _tiny(3)
    v = _picture((16, 24, 20)).astype(np.int16)
    geo = Geometry((2.0, 0.5, 0.75), (10.0, -4.0, 30.0), tuple(np.eye(3).reshape(-1)))
    write_image(MedicalImage(v[None], geo), tmp_path / "vol.mha")
    _same(predictor3.predict_image(tmp_path / "vol.mha", pre3), predictor3.predict_image(MedicalImage(v[None], geo), pre3))


@pytest.mark.parametrize("image, kw, needle", [
    (np.zeros((4, 40, 48), np.uint8), {}, r"2D inputs.*H x W.*\(4, 40, 48\)"),  # channels first: not what a 2D model takes
    (np.zeros((2, 3, 40, 48), np.uint8), {}, r"2D inputs.*\(2, 3, 40, 48\)"),
    (np.zeros((40, 48), np.uint8), {"spacing": (1.0,)}, r"spacing must have 2 entries"),
    (np.zeros((40, 48), np.uint8), {"origin": (0.0, 0.0, 0.0)}, r"origin must have 2 entries"),
    (torch.zeros(40, 48), {}, r"MedicalImage, a numpy array or a path, got Tensor"),
    (MedicalImage(np.zeros((1, 40, 48), np.uint8), Geometry.identity(2)), {"spacing": (1.0, 1.0)}, r"numpy array"),
])
def test_wrong_inputs_are_one_sentence(image, kw, needle):
    predictor, pre = _tiny(2)
    with pytest.raises(ValueError, match=needle):
        predictor.predict_image(image, pre, **kw)


def test_3d_model_refuses_a_2d_array():
    predictor, pre = _tiny(3)
    with pytest.raises(ValueError, match=r"3D inputs.*Z x Y x X.*\(40, 48\)"):
        predictor.predict_image(np.zeros((40, 48), np.uint8), pre)


def test_import_medetect_stays_light():
    code = ("import sys, medetect; assert 'torch' not in sys.modules; "
            "assert {'load_model', 'Predictor'} <= set(dir(medetect)); "
            "assert medetect.Predictor.__name__ == 'Predictor' and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        medetect.nothing_here  # noqa: B018


def test_readme_example_on_a_path_and_on_an_array():
    model = medetect.load_model(BCCD_WEIGHTS)
    assert medetect.load_model(str(BCCD_WEIGHTS)).kind == "detector"
    predictor = medetect.Predictor(model.model, device="cpu")
    det = predictor.predict_image(str(BCCD_IMAGE), model.preprocess)
    det_array = predictor.predict_image(np.asarray(Image.open(BCCD_IMAGE)), model.preprocess)
    assert len(det["boxes"]) > 5  # blood cells found
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(det_array[k], det[k])
