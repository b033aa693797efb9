"""Test-time augmentation (``model.tta: flips``): :func:`medetect.boxes.fuse_views` and the Predictor's flipped
views mapped back, in 2D and 3D."""

from __future__ import annotations

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
    corners = {tuple(b) for b in det["boxes"][1:].round().int().tolist()}
    assert len(corners) == n and all(all(v in (0, 4) or v >= s - 4 for v, s in zip(b, shape[1:] * 2)) for b in corners)
    plain = Predictor(_Brightest(ndim, corner=True), device="cpu", min_size=8, tta="none").predict(img)
    assert plain["scores"].tolist() == pytest.approx([0.9, 0.8])
    with pytest.raises(ValueError, match="tta must be 'none' or 'flips'"):
        Predictor(_Brightest(ndim, corner=True), device="cpu", tta="rot90")
