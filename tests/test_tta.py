"""Test-time augmentation (``model.tta: flips``): :func:`medetect.boxes.fuse_views` and the Predictor's flipped
views mapped back, in 2D and 3D."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medetect.boxes import fuse_views
from medetect.engine.predictor import Predictor


def test_fuse_views_averages_over_all_views_and_weights_the_boxes():
    boxes = torch.tensor([[10.0, 10, 20, 20], [11, 11, 21, 21], [50, 50, 60, 60], [10, 10, 20, 20]])
    scores = torch.tensor([0.8, 0.6, 0.9, 0.5])
    labels = torch.tensor([0, 0, 0, 1])
    views = torch.tensor([0, 1, 0, 1])
    b, s, lab = fuse_views(boxes, scores, labels, views, 2, 0.5)
    assert s.tolist() == pytest.approx([0.7, 0.45, 0.25])  # seen in both views; one view; the other class apart
    assert lab.tolist() == [0, 0, 1]
    assert b[0].tolist() == pytest.approx(((boxes[0] * 0.8 + boxes[1] * 0.6) / 1.4).tolist())
    assert b[1].tolist() == [50, 50, 60, 60]
    # two boxes of ONE view in a cluster: the view counts once, with its best score
    b, s, _ = fuse_views(boxes[:2], torch.tensor([0.8, 0.6]), torch.tensor([0, 0]), torch.tensor([0, 0]), 2, 0.5)
    assert s.tolist() == pytest.approx([0.4]) and len(b) == 1
    e = fuse_views(torch.zeros(0, 6), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 8, 0.5)
    assert [len(t) for t in e] == [0, 0, 0]


class _Brightest(torch.nn.Module):
    """A flip-equivariant 'detector': one box of side 4 around the brightest voxel (score 0.9), plus, with
    ``corner``, a box at the origin corner whatever the image (score 0.8), which no flip maps onto itself."""

    def __init__(self, ndim: int, corner: bool):
        super().__init__()
        self.d, self.corner = ndim, corner
        self.config = SimpleNamespace(tta="flips", nms_thresh=0.5, detections_per_img=10)

    def forward(self, x):
        out = []
        for img in x:
            idx = torch.tensor(torch.unravel_index(img[0].argmax(), img.shape[1:]), dtype=torch.float32)
            boxes, scores = [torch.cat([idx - 1.5, idx + 2.5])], [0.9]
            if self.corner:
                boxes.append(torch.tensor([0.0] * self.d + [4.0] * self.d))
                scores.append(0.8)
            out.append({"boxes": torch.stack(boxes), "scores": torch.tensor(scores), "labels": torch.zeros(len(scores), dtype=torch.long)})
        return {"detections": out}


@pytest.mark.parametrize("ndim", [2, 3])
def test_flipped_views_map_back_onto_the_image(ndim):
    shape = (1,) + (40, 36, 28)[:ndim]
    img = torch.zeros(shape)
    spot = (7, 22, 5)[:ndim]
    img[(0, *spot)] = 1.0
    det = Predictor(_Brightest(ndim, corner=False), device="cpu", min_size=8).predict(img)
    want = torch.tensor(spot, dtype=torch.float32)
    assert det["boxes"].shape[0] == 1  # every view agrees
    assert det["boxes"][0].tolist() == pytest.approx(torch.cat([want - 1.5, want + 2.5]).tolist(), abs=1e-5)
    assert det["scores"].tolist() == pytest.approx([0.9])
    det = Predictor(_Brightest(ndim, corner=True), device="cpu", min_size=8).predict(img)
    n = 2**ndim
    assert len(det["scores"]) == 1 + n  # the corner box lands on a different corner in each view
    assert det["scores"][1:].tolist() == pytest.approx([0.8 / n] * n)
    corners = det["boxes"][1:]  # [n, 2d]: n different boxes, each edge on 0 or 4 or within 4 of the far border
    apart = (corners[:, None] - corners[None]).abs().amax(-1) > 1e-3
    assert bool(apart[~torch.eye(n, dtype=torch.bool)].all())
    far = torch.tensor(shape[1:] * 2, dtype=corners.dtype) - 4 - 1e-4
    assert bool(((corners.abs() <= 1e-4) | ((corners - 4).abs() <= 1e-4) | (corners >= far)).all())
    plain = Predictor(_Brightest(ndim, corner=True), device="cpu", min_size=8, tta="none").predict(img)
    assert plain["scores"].tolist() == pytest.approx([0.9, 0.8])
    with pytest.raises(ValueError, match="tta must be 'none' or 'flips'"):
        Predictor(_Brightest(ndim, corner=True), device="cpu", tta="rot90")


def test_predict_and_evaluate_take_tta_from_the_command_line(tmp_path, capsys):
    """``--tta flips`` on a model file trained without it: predict and evaluate run the flipped views (the fused
    scores differ from the plain ones) and a bad value is refused in one sentence."""
    import numpy as np
    from PIL import Image

    from medetect.cli import main
    from medetect.data.annotations import ImageAnnotation, write_voc
    from medetect.models.detector import DetectorConfig, build_detector
    from medetect.models.io import Preprocess, save_model

    torch.manual_seed(0)
    cfg = DetectorConfig(ndim=2, in_channels=1, num_classes=1, class_names=["x"], base_width=8, fpn_channels=16,
                         levels=[2, 3], anchor_sizes=[[8], [16]], aspect_ratios=[1.0], score_thresh=0.0)
    w = tmp_path / "m.safetensors"
    save_model(build_detector(cfg).eval(), w, kind="detector", classes=["x"],
               preprocess=Preprocess(ndim=2, channels=1, bit_depth=8, value_range=[0, 255]))
    voc = tmp_path / "voc"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    img = (np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8)
    Image.fromarray(img).save(voc / "JPEGImages" / "a.png")
    write_voc(ImageAnnotation("JPEGImages/a.png", np.array([[10.0, 10, 30, 30]]), ["x"], image_shape=(64, 48)),
              voc / "Annotations" / "a.xml")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    scores = {}
    for tta in ("none", "flips"):
        assert main(["predict", "--weights", str(w), str(voc / "JPEGImages" / "a.png"), "--out", str(tmp_path / tta),
                     "--score-thresh", "0", "--tta", tta]) == 0
        scores[tta] = json.loads((tmp_path / tta / "predictions.json").read_text())
        assert main(["evaluate", "--weights", str(w), "--data", f"{voc}:val", "--json", "--tta", tta]) == 0
    assert scores["none"] != scores["flips"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--weights", str(w), "--data", f"{voc}:val", "--tta", "rot90"])
    assert e.value.code == 2 and "--tta: invalid choice: 'rot90'" in capsys.readouterr().err
