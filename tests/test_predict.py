"""The one predict path (medetect.apps.predict.predict_paths, Predictor.predict_image, data.preprocess.prepare):
stored preprocessing applied, caps, input checks, tiles, outputs."""

import csv
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medetect.apps.predict import predict_paths
from medetect.convert import Geometry
from medetect.data.image import MedicalImage
from medetect.data.preprocess import normalize_intensity, prepare
from medetect.engine.predictor import Predictor
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, save_model

ROOT = Path(__file__).resolve().parents[1]
NODULE = ROOT / "medetect" / "weights" / "nodule_phantom_det3d.safetensors"
BCCD = ROOT / "medetect" / "weights" / "bccd_faster_rcnn.safetensors"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sphere_nifti(path, *, spacing_xyz=(0.5, 0.5, 10.0), size_xyz=(128, 128, 12), diameter=20.0, angle=30.0):
    """Air with a soft-tissue sphere, anisotropic, rotated about z (non-identity direction); returns the world
    centre (x, y, z) of the sphere."""
    sitk = pytest.importorskip("SimpleITK")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    origin = (-20.0, 15.0, -60.0)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(*(np.arange(n) + 0.0 for n in (nz, ny, nx)), indexing="ij")
    idx = np.array([nx / 2, ny / 2, nz / 2 - 0.5])  # sphere centre in continuous index (x, y, z)
    d = np.asarray(direction).reshape(3, 3)
    sp = np.asarray(spacing_xyz)
    off = np.stack([x - idx[0], y - idx[1], z - idx[2]], -1) * sp  # mm along index axes (rotation keeps lengths)
    inside = np.linalg.norm(off, axis=-1) <= diameter / 2
    vol = np.where(inside, 40, -900).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return np.asarray(origin) + d @ (idx * sp)


def test_anisotropic_rotated_nifti_same_marks_as_luna_predict(tmp_path):
    """Issue 1: generic predict applies the model's 1 mm resampling and HU window, like luna predict."""
    from medetect.data.io import read_image
    from medetect.luna.detection import load_luna_model, predict_scan

    f = tmp_path / "CT.nii.gz"
    centre = _sphere_nifti(f)
    written = predict_paths(NODULE, [f], tmp_path / "out", progress=False, score_thresh=0.0)
    rows = _rows(written[0])
    assert list(rows[0])[:8] == ["z0", "y0", "x0", "z1", "y1", "x1", "label", "score"]
    assert {"centre_x_mm", "centre_y_mm", "centre_z_mm", "diameter_mm"} <= set(rows[0])
    got = np.array([[float(r[f"centre_{a}_mm"]) for a in "xyz"] for r in rows])
    model, pre = load_luna_model(NODULE)
    ref = predict_scan(model, pre, read_image(f), score_thresh=0.0)
    n = min(len(got), len(ref["probabilities"]))
    assert n > 0
    np.testing.assert_allclose(got[:n], ref["centres_xyz"][:n], atol=1e-3)
    np.testing.assert_allclose([float(r["score"]) for r in rows[:n]], ref["probabilities"][:n], atol=1e-5)
    assert np.linalg.norm(got[0] - centre) < 5.0, (got[0], centre)  # the top mark is the sphere
    js = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(js[str(f)]["centres_mm"]) == len(rows)


def _many_box_model():
    """An untrained RetinaNet with a zero score threshold: hundreds of detections on any image."""
    torch.manual_seed(0)
    cfg = DetectorConfig(arch="retinanet", ndim=2, in_channels=1, num_classes=1, base_width=8, fpn_channels=16,
                         levels=[3], anchor_sizes=[[8]], aspect_ratios=[1.0], score_thresh=0.0, nms_thresh=0.99,
                         detections_per_img=100)
    return build_detector(cfg).eval()


def test_max_detections_not_silently_100():
    """Issue 2: the cap is the user's and reaching it warns."""
    model = _many_box_model()
    x = torch.rand(1, 128, 128)
    with pytest.warns(UserWarning, match="max_detections=100 was reached"):
        det = Predictor(model, device="cpu", score_thresh=0.0).predict(x)
    assert len(det["scores"]) == 100
    with pytest.warns(UserWarning, match="max_detections=250 was reached"):
        det = Predictor(model, device="cpu", score_thresh=0.0, max_detections=250).predict(x)
    assert len(det["scores"]) == 250
    assert model.heads.detections_per_img == 100  # restored
    with pytest.warns(UserWarning, match="max_detections=150 was reached"):  # tiles included
        det = Predictor(model, device="cpu", score_thresh=0.0, max_detections=150, tile_size=(64, 64)).predict(x)
    assert len(det["scores"]) == 150
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = Predictor(model, device="cpu", score_thresh=0.0, max_detections=100000).predict(x)
    assert 250 < len(det["scores"]) < 100000


def test_predict_paths_max_detections_warns_with_file(tmp_path):
    from PIL import Image

    w = tmp_path / "m.safetensors"
    save_model(_many_box_model(), w, kind="detector", preprocess=Preprocess(ndim=2, channels=1, bit_depth=8,
                                                                            value_range=[0, 255]), classes=["x"])
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match=r"a\.png: .*max_detections=120"):
        out = predict_paths(w, [tmp_path / "a.png"], tmp_path / "o", max_detections=120, score_thresh=0.0,
                            progress=False)
    rows = _rows(out[0])
    assert len(rows) == 120 and list(rows[0]) == ["y0", "x0", "y1", "x1", "label", "score"]


def test_non_safetensors_weights_friendly(tmp_path):
    """Issue 3: a pickle given as weights is one sentence, not a SafetensorError traceback."""
    pt = tmp_path / "model.safetensors"
    torch.save({"a": torch.zeros(2)}, pt)
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a safetensors model file: pickled checkpoints are never loaded"):
        predict_paths(pt, [tmp_path / "x.png"], tmp_path / "o", progress=False)


def test_16bit_png_refused_then_allowed(tmp_path):
    """Issue 4: a 16-bit PNG given to an 8-bit model is refused (far outside), or predicted when allowed."""
    from PIL import Image

    rgb16 = (np.random.default_rng(0).random((64, 64, 3)) * 1000 + 500).astype(np.uint16)
    img = MedicalImage(np.moveaxis(rgb16, -1, 0), Geometry.identity(2), path="x16.png")
    pre = Preprocess(ndim=2, channels=3, bit_depth=8, value_range=[0, 255], scale=0.5)
    with pytest.raises(ValueError, match="8-bit inputs in \\[0, 255\\].*allow_range_mismatch"):
        prepare(img, pre)
    prepare(img, pre, allow_range_mismatch=True)
    mild = MedicalImage(np.full((3, 8, 8), 300, dtype=np.uint16), Geometry.identity(2), path="mild.png")
    with pytest.warns(UserWarning, match="mild.png: values span \\[300, 300\\]"):
        prepare(mild, pre)
    Image.fromarray(rgb16[..., 0]).save(tmp_path / "gray16.png")  # through the application, a 1-channel model
    w = tmp_path / "m.safetensors"
    save_model(_many_box_model(), w, kind="detector",
               preprocess=Preprocess(ndim=2, channels=1, bit_depth=8, value_range=[0, 255]), classes=["x"])
    with pytest.raises(ValueError, match="gray16.png: values span"):
        predict_paths(w, [tmp_path / "gray16.png"], tmp_path / "o", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = predict_paths(w, [tmp_path / "gray16.png"], tmp_path / "o", progress=False, allow_range_mismatch=True)
    assert len(out) == 1


def test_one_voxel_volume_and_dimension_mismatch(tmp_path):
    """Issue 4: a 1-voxel volume is padded with air (no phantom marks); a 3D model refuses a 2D image."""
    from medetect.luna.detection import load_luna_model, predict_scan

    model, pre = load_luna_model(NODULE)
    one = MedicalImage(np.full((1, 1, 1, 1), -800, dtype=np.int16), Geometry.identity(3))
    marks = predict_scan(model, pre, one)
    assert len(marks["probabilities"]) == 0 or marks["probabilities"].max() < 0.05
    flat = MedicalImage(np.zeros((1, 32, 32), dtype=np.int16), Geometry.identity(2), path="slice.png")
    with pytest.raises(ValueError, match="slice.png: the model takes 3D inputs but this is a 2D image"):
        prepare(flat, pre.as_preprocess())
    vol = MedicalImage(np.zeros((3, 4, 8, 8), dtype=np.uint8), Geometry.identity(3), path="vol.nii")
    with pytest.raises(ValueError, match="vol.nii: the model takes 2D inputs but this is a 3D volume"):
        prepare(vol, Preprocess(ndim=2, channels=3))


def test_tile_sizes_checked_and_reported_as_given(tmp_path):
    """Issue 5: --tile 0 0 is a sentence, and values are quoted as the user typed them (not scaled)."""
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for tile, text in (([0, 0], "0 0"), ([-5, 10], "-5 10"), ([100, 100, 100], "100 100 100"), ([2.5, 3], "2.5 3")):
        with pytest.raises(ValueError, match=f"--tile .*got {text}$"):
            predict_paths(BCCD, [tmp_path / "a.png"], tmp_path / "o", tile_size=tile, progress=False)
    with pytest.raises(ValueError, match="--tile"):
        Predictor(_many_box_model(), device="cpu", tile_size=(0, 0))


def test_skip_errors_records_and_continues(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError):
        predict_paths(BCCD, [tmp_path / "bad.png", tmp_path / "good.png"], tmp_path / "o", progress=False)
    with pytest.warns(UserWarning, match="1 of 2 inputs failed"):
        out = predict_paths(BCCD, [tmp_path / "bad.png", tmp_path / "good.png"], tmp_path / "o2", progress=False,
                            skip_errors=True)
    assert [p.name for p in out] == ["good.csv"]
    errs = _rows(tmp_path / "o2" / "errors.csv")
    assert len(errs) == 1 and errs[0]["input"].endswith("bad.png") and errs[0]["error"]


def test_one_normalisation_family():
    x = torch.tensor([[[-1200.0, -1000.0, -300.0, 400.0, 900.0]]])
    torch.testing.assert_close(normalize_intensity(x, window=[-1000, 400]), torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))
    y = torch.tensor([[[0.0, 255.0]]])
    torch.testing.assert_close(normalize_intensity(y, 255.0, [0.5], [0.25]), torch.tensor([[[-2.0, 2.0]]]))
    from medetect.data.transforms import HUWindow, Normalize

    torch.testing.assert_close(HUWindow(lo=-1000, hi=400)({"image": x})["image"], normalize_intensity(x, window=[-1000, 400]))
    torch.testing.assert_close(Normalize(mean=[0.5], std=[0.25])({"image": y / 255})["image"],
                               normalize_intensity(y, 255.0, [0.5], [0.25]))


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    predict_paths(BCCD, [tmp_path], tmp_path / "o", progress=True)
    assert "predict" not in capsys.readouterr().err  # not a terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    predict_paths(BCCD, [tmp_path], tmp_path / "o", progress=True)
    assert "predict" in capsys.readouterr().err
    predict_paths(BCCD, [tmp_path], tmp_path / "o", progress=False)
    assert "predict" not in capsys.readouterr().err
