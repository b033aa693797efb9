"""R-CNN: warps with context padding, SVMs with hard negative mining and ridge regressors on synthetic features, the
whole step on synthetic images (a class without positives, an image without proposals, save/load round trip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medetect.lineage.data import LineageSet
from medetect.lineage.rcnn import RCNNStepConfig, train_box_regressor, train_svm
from medetect.models.rcnn import RCNNConfig, build_rcnn, context_boxes

torch.set_num_threads(1)


def test_context_padding_geometry():
    m = build_rcnn(RCNNConfig(warp_size=64, context_padding=8, base_width=8, hidden=16))
    img = torch.zeros(1, 3, 100, 120)
    img[:, :, 20:40, 30:50] = 1.0
    w = m.warp(img, torch.tensor([[0.0, 20, 30, 40, 50]]))  # [1, 3, 64, 64]
    assert w.shape == (1, 3, 64, 64)
    row, col = w[0, 0, 32], w[0, 0, :, 32]
    # the box fills warp pixels [8, 56): 8 context pixels of zeros each side, the half-value edge at exactly 8 / 56
    assert torch.all(row[:7] == 0) and torch.all(row[57:] == 0) and torch.all(row[9:55] == 1)
    assert float(row[7] + row[8]) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(row, col) and torch.allclose(row, row.flip(0), atol=1e-5)
    assert torch.allclose(context_boxes(torch.tensor([20.0, 30, 40, 50]), 64, 8),
                          torch.tensor([20 - 10 / 3, 30 - 10 / 3, 40 + 10 / 3, 50 + 10 / 3]))


def test_warp_without_padding_is_a_bilinear_resize():
    m = build_rcnn(RCNNConfig(warp_size=32, context_padding=0, base_width=8, hidden=16))
    img = torch.rand(2, 3, 48, 80)
    w = m.warp(img, torch.tensor([[1.0, 0, 0, 48, 80]]))
    ref = F.interpolate(img[1:], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(w, ref, atol=1e-5)


def test_svm_with_hard_negative_mining():
    rng = np.random.default_rng(0)
    pos = rng.normal(0, 1, (40, 8)) + np.array([3.0] + [0] * 7)
    easy = rng.normal(0, 1, (1000, 8)) + np.array([-4.0] + [0] * 7)
    hard = rng.normal(0, 0.3, (60, 8)) + np.array([1.0] + [0] * 7)  # near the positives: rarely drawn at random
    neg = np.concatenate([easy, hard]).astype(np.float32)
    cfg = RCNNStepConfig(initial_negatives=200, hard_negative_rounds=3, hard_negatives_per_round=100, svm_c=0.1)
    w, b, info = train_svm(pos.astype(np.float32), neg, cfg, seed=0)
    assert w.shape == (8,) and info["rounds"] >= 1 and info["negatives_used"] > 200
    assert info["train_pos_acc"] >= 0.95 and info["train_neg_acc"] >= 0.99
    assert float(((hard @ w + b) < 0).mean()) >= 0.9  # the mined negatives are now on the negative side
    with pytest.raises(ValueError, match="positives and negatives"):
        train_svm(pos[:0].astype(np.float32), neg, cfg)


def test_ridge_regressor_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (400, 6))
    true_w = rng.normal(0, 1, (4, 6))
    y = x @ true_w.T + np.array([0.1, -0.2, 0.3, 0.0])
    w, b = train_box_regressor(x, y, alpha=1e-6)
    assert w.shape == (4, 6) and b.shape == (4,)
    assert np.allclose(w, true_w, atol=1e-4) and np.allclose(b, [0.1, -0.2, 0.3, 0.0], atol=1e-4)


def test_step_config_errors():
    with pytest.raises(ValueError, match="rcnn.context_padding"):
        RCNNStepConfig(warp_size=32, context_padding=16).validate()
    with pytest.raises(ValueError, match="rcnn.warp_size"):
        RCNNStepConfig(warp_size=8).validate()


# ------------------------------------------------------------------------------------------------ the whole step


def _discs(n: int, seed: int) -> LineageSet:
    """Images with red and blue discs (classes 0 and 1); class 2 ("ghost") never occurs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    images, boxes, labels = [], [], []
    for _ in range(n):  # loop over images
        img = torch.full((3, 64, 64), 128.0)
        bx, lb = [], []
        for k, colour in enumerate(([230.0, 20.0, 20.0], [20.0, 20.0, 230.0])):
            cy, cx = (torch.rand(2, generator=g) * 36 + 14).tolist()
            r = 7.0 + 3 * float(torch.rand(1, generator=g))
            inside = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
            img[:, inside] = torch.tensor(colour)[:, None]
            bx.append([cy - r, cx - r, cy + r, cx + r])
            lb.append(k)
        images.append(img)
        boxes.append(torch.tensor(bx))
        labels.append(torch.tensor(lb))
    return LineageSet(images, boxes, labels, [f"disc{i}.png" for i in range(n)], ["red", "blue", "ghost"], 1.0,
                      "synthetic")


def _fake_proposals(data, cfg, cache_dir=None, progress=False):
    """Jittered ground-truth boxes + random boxes, in place of selective search (no OpenCV needed)."""
    from medetect.proposals import uniform_boxes

    out = []
    for i, b in enumerate(data.boxes):  # loop over images
        g = torch.Generator().manual_seed(i)
        jit = b[None] + torch.randn(8, *b.shape, generator=g) * 1.5
        out.append(torch.cat([jit.reshape(-1, 4), uniform_boxes(data.images[i].shape[1:], 40, seed=i)]))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import medetect.lineage.rcnn as step

    mp = pytest.MonkeyPatch()
    mp.setattr(step, "proposals_for", _fake_proposals)
    out = tmp_path_factory.mktemp("rcnn")
    cfg = RCNNStepConfig(warp_size=32, context_padding=2, base_width=8, hidden=32, epochs=1, batch_images=2,
                         rois_per_image=16, max_features_per_image=24, initial_negatives=50, svm_c=0.1,
                         min_reg_examples=5)
    with pytest.warns(RuntimeWarning, match="'ghost' has no training positives"):
        res = step.train_rcnn(_discs(4, 0), None, cfg, out, progress=False)
    mp.undo()
    return res, out, cfg


def test_train_record_and_class_without_positives(trained):
    res, out, _ = trained
    rec = json.loads((out / "rcnn.json").read_text())
    assert rec["train_seconds"] > 0 and rec["config"]["warp_size"] == 32 and rec["train_images"] == 4
    assert rec["svm_ridge"]["classes"]["ghost"]["has_svm"] is False and "no training positives" in rec["svm_ridge"]["classes"]["ghost"]["note"]
    assert rec["svm_ridge"]["classes"]["red"]["has_svm"] is True and rec["svm_ridge"]["classes"]["red"]["regressor"] is True
    assert len(list((out / "runs" / "rcnn" / "features").glob("*.npz"))) == 4


def test_features_are_reused_on_resume(trained, monkeypatch):
    import medetect.lineage.rcnn as step

    _, out, cfg = trained
    monkeypatch.setattr(step, "proposals_for", _fake_proposals)
    with pytest.warns(RuntimeWarning):
        again = step.train_rcnn(_discs(4, 0), None, cfg, out, resume=True, progress=False)
    assert again["record"]["feature_cache_hits"] == 4


def test_save_load_round_trip_and_detect(trained, monkeypatch):
    import medetect.lineage.rcnn as step
    from medetect.models.io import load_model

    res, _, _ = trained
    loaded = load_model(res["weights"])
    assert loaded.kind == "rcnn" and loaded.classes == ["red", "blue", "ghost"]
    assert loaded.model.has_svm.tolist() == [True, True, False]
    assert loaded.model.config.warp_size == 32
    method = step.load_rcnn(res["weights"])
    assert method.name == "R-CNN"
    data = _discs(2, 7)
    monkeypatch.setattr(step, "propose", lambda image, cfg: _fake_proposals(data, cfg)[0])
    det = method.detect(data.images[0])
    assert set(det) >= {"boxes", "scores", "labels", "num_proposals", "proposal_seconds"}
    assert det["num_proposals"] == 56 and det["boxes"].shape[1] == 4
    assert not bool((det["labels"] == 2).any())  # no SVM for the ghost class: never detected
    monkeypatch.setattr(step, "propose", lambda image, cfg: torch.zeros(0, 4))
    empty = method.detect(data.images[0])  # an image where selective search finds no region
    assert empty["boxes"].shape == (0, 4) and empty["num_proposals"] == 0 and len(empty["labels"]) == 0
    with pytest.raises(ValueError, match="not an R-CNN"):
        from pathlib import Path

        step.load_rcnn(Path(step.__file__).resolve().parents[1] / "weights" / "bccd_faster_rcnn.safetensors")
