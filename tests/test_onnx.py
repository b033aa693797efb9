"""ONNX export of the dense part of a detector (skips without onnx/onnxruntime)."""

import os
import stat

import numpy as np
import pytest
import torch

from medetect.apps.export import _DenseGraph, export_onnx
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, load_model, save_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_onnx_matches_torch(tmp_path, arch):
    torch.manual_seed(0)
    cfg = DetectorConfig(arch=arch, ndim=2, in_channels=1, num_classes=2, base_width=8, fpn_channels=16, roi_hidden=16,
                         levels=[3, 4], anchor_sizes=[[16], [32]])
    model = build_detector(cfg).eval()
    w = tmp_path / "m.safetensors"
    save_model(model, w, kind="detector", preprocess=Preprocess(), classes=["a", "b"])
    old = os.umask(0o077)
    try:
        path = export_onnx(w, tmp_path / "m.onnx", [64, 96])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    x = np.random.default_rng(0).standard_normal((1, 1, 64, 96)).astype(np.float32)
    got = ort.InferenceSession(str(path)).run(None, {"image": x})
    loaded = load_model(w).model
    want = _DenseGraph(loaded)(torch.from_numpy(x))
    assert len(got) == len(want)
    for g, t in zip(got, want):
        assert g.shape == tuple(t.shape)
        np.testing.assert_allclose(g, t.detach().numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_wrong_dims(tmp_path):
    cfg = DetectorConfig(ndim=2, in_channels=1, num_classes=1, base_width=8, fpn_channels=16, roi_hidden=16)
    w = tmp_path / "m.safetensors"
    save_model(build_detector(cfg), w, kind="detector", preprocess=Preprocess(), classes=["a"])
    with pytest.raises(ValueError, match="2 sizes"):
        export_onnx(w, tmp_path / "m.onnx", [32, 32, 32])
