"""Classification + localisation (medetect.models.localizer): shapes, losses and their options, the fully
convolutional conversion (OverFeat) against the fully connected net, and the model file round trip. Tiny nets
(base_width 8, hidden 16), 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medetect.models.io import BUILDERS, Preprocess, load_model, save_model
from medetect.models.localizer import Localizer, LocalizerConfig

torch.set_num_threads(1)

WINDOW = {2: 64, 3: 32}


def tiny(d: int = 2, **kw) -> LocalizerConfig:
    base = dict(ndim=d, in_channels=1, num_classes=2, base_width=8, window=WINDOW[d], hidden=16)
    base.update(kw)
    return LocalizerConfig(**base)


def targets(d: int, boxes_labels) -> list[dict]:
    out = []
    for item in boxes_labels:
        if item is None:
            out.append({"boxes": torch.zeros(0, 2 * d), "labels": torch.zeros(0, dtype=torch.long)})
        else:
            b, lab = item
            out.append({"boxes": torch.tensor([b], dtype=torch.float32), "labels": torch.tensor([lab])})
    return out


class PatchTrunk(nn.Module):
    """A trunk without padding: a stride-s patch convolution + ReLU + 1x1 conv. Its features of a window are exactly
    the image's features at the window's place, so the slid net must equal the window net everywhere."""

    def __init__(self, d: int, s: int = 8, c: int = 6):
        super().__init__()
        Conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
        self.net = nn.Sequential(Conv(1, c, s, stride=s), nn.ReLU(), Conv(c, c, 1))
        self.channels, self.stride = c, (s,) * d

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("d", [2, 3])
def test_shapes_and_losses(d):
    torch.manual_seed(0)
    m = Localizer(tiny(d))
    assert m.feature_size == (WINDOW[d] // 16,) * d and m.stride == (16,) * d
    x = torch.randn(3, 1, *(WINDOW[d],) * d)
    box = [2.0] * d + [20.0] * d
    out = m(x, targets(d, [(box, 0), None, (box, 1)]))
    assert out["logits"].shape == (3, 3) and out["boxes"].shape == (3, 2, 2 * d)
    assert set(out["losses"]) == {"loss_cls", "loss_box"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    sum(out["losses"].values()).backward()
    assert m.fc6.weight.grad is not None and m.box.weight.grad.abs().sum() > 0
    # background only: no box loss
    bg = m(x[:2], targets(d, [None, None]))["losses"]
    assert float(bg["loss_box"].detach()) == 0.0 and float(bg["loss_cls"].detach()) > 0


def _hand_set(m: Localizer, boxes_per_class: torch.Tensor) -> None:
    """Box head independent of the input: bias = the given normalised boxes."""
    with torch.no_grad():
        m.box.weight.zero_()
        m.box.bias.copy_(boxes_per_class.flatten())


@pytest.mark.parametrize("loss", ["smooth_l1", "l2"])
def test_box_loss_uses_true_class_box(loss):
    d, w = 2, 64
    m = Localizer(tiny(d, box_loss=loss, box_weight=2.0)).eval()
    _hand_set(m, torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]))
    t = targets(d, [([16.0, 16.0, 48.0, 48.0], 1), ([0.0, 0.0, 32.0, 48.0], 0), None])
    got = m(torch.randn(3, 1, w, w), t)["losses"]["loss_box"]
    # crop 0 (class 1): its box is exact -> 0; crop 1 (class 0): one coordinate off by 0.25 (x1: 0.5 vs 0.75)
    diff = torch.tensor(0.25)
    per = diff - 0.5 / 9 if loss == "smooth_l1" else diff**2
    assert float(got.detach()) == pytest.approx(float(2.0 * per / 2), rel=1e-5)  # mean over the 2 object crops, weight 2


def test_class_agnostic_box_head():
    m = Localizer(tiny(2, class_agnostic=True, num_classes=3))
    assert m.box.out_features == 4
    out = m(torch.randn(2, 1, 64, 64))
    assert out["boxes"].shape == (2, 3, 4)
    assert torch.equal(out["boxes"][:, 0], out["boxes"][:, 2])
    per_class = Localizer(tiny(2, num_classes=3))
    assert per_class.box.out_features == 12


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("agnostic", [False, True])
def test_fully_convolutional_equals_fc_on_one_window(d, agnostic):
    torch.manual_seed(1)
    m = Localizer(tiny(d, class_agnostic=agnostic, norm="batch")).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    net = m.fully_convolutional()
    x = torch.randn(2, 1, *(WINDOW[d],) * d)
    a, b = m(x), net(x)
    assert b["logits"].shape == (2, 3) + (1,) * d
    torch.testing.assert_close(b["logits"].flatten(1), a["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["boxes"].flatten(2), a["boxes"], atol=1e-5, rtol=0)
    # the copy is independent of the original
    with torch.no_grad():
        m.fc6.weight.add_(1.0)
    assert not torch.allclose(net(x)["logits"].flatten(1), m(x)["logits"])


@pytest.mark.parametrize("d", [2, 3])
def test_score_map_location_is_the_window_there(d):
    """A padding-free trunk: map location i equals the FC net on the input window at i * stride, exactly."""
    torch.manual_seed(2)
    w = 32 if d == 2 else 16
    m = Localizer(tiny(d, window=w), trunk=PatchTrunk(d)).eval()
    net = m.fully_convolutional()
    extra = 3
    big = torch.randn(1, 1, *(w + 8 * extra,) * d)
    out = net(big)
    assert out["logits"].shape[2:] == (extra + 1,) * d
    locs = [(0,) * d, (extra,) * d, (1, extra) + (2,) * (d - 2)]
    for loc in locs:
        sl = tuple(slice(i * 8, i * 8 + w) for i in loc)
        ref = m(big[(slice(None), slice(None)) + sl])
        torch.testing.assert_close(out["logits"][(0, slice(None)) + loc], ref["logits"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["boxes"][(0, slice(None), slice(None)) + loc], ref["boxes"][0], atol=1e-5,
                                   rtol=0)


def test_resnet_score_map_is_the_head_on_feature_windows():
    """With the padded ResNet trunk, location (i, j) is the FC head on the trunk features [i, i + k) of the image."""
    torch.manual_seed(3)
    m = Localizer(tiny(2)).eval()
    net = m.fully_convolutional()
    big = torch.randn(1, 1, 64 + 16 * 3, 64 + 16 * 2)
    out = net(big)
    feats = m.trunk(big)
    k = m.feature_size
    assert out["logits"].shape[2:] == (feats.shape[2] - k[0] + 1, feats.shape[3] - k[1] + 1) == (4, 3)
    for i, j in [(0, 0), (3, 2), (1, 2)]:
        logits, boxes = m.head(feats[:, :, i: i + k[0], j: j + k[1]])
        torch.testing.assert_close(out["logits"][0, :, i, j], logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["boxes"][0, :, :, i, j], boxes[0] * 64, atol=1e-4, rtol=0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="localizer.window must be a multiple"):
        Localizer(tiny(2, window=72))
    with pytest.raises(ValueError, match="localizer.box_loss"):
        tiny(2, box_loss="l1").validate()
    with pytest.raises(ValueError, match="localizer.stage"):
        tiny(2, backbone="vgg16", stage=2).validate()
    with pytest.raises(ValueError, match="expects images of shape"):
        Localizer(tiny(2))(torch.randn(1, 1, 32, 32))


def test_save_load_round_trip(tmp_path):
    assert "localizer" in BUILDERS
    torch.manual_seed(4)
    m = Localizer(tiny(2, class_agnostic=True)).eval()
    f = save_model(m, tmp_path / "loc.safetensors", kind="localizer", fp16=False,
                   preprocess=Preprocess(ndim=2, channels=1), classes=["a", "b"], extra={"window": 64})
    lm = load_model(f)
    assert lm.kind == "localizer" and lm.classes == ["a", "b"] and lm.meta["extra"]["window"] == 64
    assert isinstance(lm.model, Localizer) and lm.model.config == m.config
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(lm.model(x)["logits"], m(x)["logits"], atol=0, rtol=0)
