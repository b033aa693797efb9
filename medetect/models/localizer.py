"""Classification + localisation (the lecture's first step) and its fully convolutional twin, OverFeat (Sermanet et
al., ICLR 2014), for any number d of spatial dims.

A :class:`Localizer` looks at ONE window (a crop of side ``window``) holding at most one object:
``trunk -> flatten -> fc6 -> fc7 -> {class logits [K + 1] (0 = background), box [2d or 2d K]}``. The box is the
object's box in the window's own pixel coordinates; the head regresses it divided by ``window`` (a number in
about [0, 1]), so the loss does not depend on the window size.

:meth:`Localizer.fully_convolutional` turns the fully connected layers into convolutions (OverFeat's trick): fc6
becomes a convolution whose kernel is the trunk's whole feature map of one window (``feature_size``), fc7 and the two
heads 1x1 convolutions, with the same weights reshaped. Run on a larger image, the :class:`OverFeatNet` then gives, at
map location ``i`` (a d-tuple), exactly the head applied to the trunk's features ``[i, i + feature_size)``, i.e. the
window whose corner is ``i * stride`` in the input -- evaluated for every window at once, sharing the trunk.

That location ``i`` equals the :class:`Localizer` on the input window ``[i * stride, i * stride + window)`` exactly
when the trunk is translation-equivariant at its stride and its features of a window do not look beyond it (valid
convolutions, a local normalisation): OverFeat's own trunk. A padded ResNet is equivariant but its features near a
window's border see the zero padding in the window and real pixels in the image (and GroupNorm's statistics would
span the whole image rather than one window): the slide is then the usual approximation of a fully convolutional
detector trained on crops. ``norm`` defaults to BatchNorm for that reason (in eval mode a per-channel affine map,
which is local).

Shape key: B batch, C trunk channels, d spatial dims, k_a trunk feature size of one window along axis a, K classes
(background excluded), H hidden width, M_a score-map size along axis a.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.resnet import ResNet
from ..backbones.vgg import VGG16
from ..layers.nd import NORM_KINDS, conv
from ..losses import smooth_l1_loss
from ..schema import check, option

__all__ = ["LocalizerConfig", "Localizer", "OverFeatNet", "Trunk", "build_localizer", "BOX_LOSSES",
           "LOCALIZER_BACKBONES", "SMOOTH_L1_BETA"]

LOCALIZER_BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg16")
BOX_LOSSES = ("smooth_l1", "l2")
SMOOTH_L1_BETA = 1.0 / 9  # Fast R-CNN's reference value (sigma = 3), here on window-normalised coordinates


@dataclass
class LocalizerConfig:
    ndim: int = option(2, doc="spatial dims: 2 for images, 3 for volumes", choices=(1, 2, 3))
    in_channels: int = option(3, doc="image channels", ge=1)
    num_classes: int = option(1, doc="object classes K, background excluded (logits have K + 1 entries, 0 = "
                              "background)", ge=1)
    backbone: str = option("resnet18", doc="trunk (medetect.backbones)", choices=LOCALIZER_BACKBONES)
    base_width: int = option(32, doc="channels of the trunk's first stage", ge=1)
    norm: str = option("batch", doc="normalisation of the trunk; batch (default) is a per-channel affine map in "
                       "eval mode, so the fully convolutional net over a whole image stays the window net; group "
                       "normalises over the whole input and is not local", choices=NORM_KINDS)
    stage: int = option(4, doc="backbone stage c<stage> feeding the head (ResNet: 4 = stride 16; VGG-16: 5 = "
                        "stride 16)", ge=2, le=5)
    window: int = option(64, doc="input side (voxels per axis); with stride 16: 4 x 4 trunk features", ge=8)
    hidden: int = option(256, doc="width of fc6 and fc7", ge=1)
    dropout: float = option(0.0, doc="dropout after fc6 and fc7 (training only)", ge=0, lt=1)
    box_loss: str = option("smooth_l1", doc="box regression loss on window-normalised coordinates: smooth_l1 "
                           "(Fast R-CNN, beta 1/9) or l2 (squared error, OverFeat)", choices=BOX_LOSSES)
    class_agnostic: bool = option(False, doc="one box for every class (2d outputs) instead of one per class (2d K)")
    box_weight: float = option(1.0, doc="weight of the box loss against the classification loss", ge=0)

    def validate(self, prefix: str = "localizer") -> None:
        check(self, prefix)
        if self.backbone == "vgg16" and self.stage < 3:
            raise ValueError(f"{prefix}.stage must be 3, 4 or 5 with vgg16, got {self.stage}")
        stride = 2 ** (self.stage - 1) if self.backbone == "vgg16" else 2**self.stage  # c<stage>'s stride
        if self.window % stride:
            raise ValueError(f"{prefix}.window must be a multiple of the trunk's stride {stride} ({self.backbone} "
                             f"c{self.stage}), got {self.window}")

    def to_dict(self) -> dict:
        return asdict(self)


class Trunk(nn.Module):
    """A backbone cut after stage ``c<stage>``: ``[B, C_in, *S] -> [B, channels, *S']`` with ``stride`` (per-axis
    tuple) between input and feature grid."""

    def __init__(self, body: nn.Module, stage: int):
        super().__init__()
        self.body, self.stage = body, stage
        offered = {f"c{i}": (c, s) for i, c, s in zip(range(6 - len(body.out_channels), 6), body.out_channels,
                                                       body.strides)}
        self.channels, self.stride = offered[f"c{stage}"]
        if isinstance(body, ResNet):  # stages after c<stage> are never run: not kept (nor stored in the file)
            body.stages = body.stages[: stage - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x, up_to=self.stage)[f"c{self.stage}"]


def build_trunk(cfg: LocalizerConfig) -> Trunk:
    if cfg.backbone == "vgg16":
        body = VGG16(ndim=cfg.ndim, in_channels=cfg.in_channels, base_width=cfg.base_width, norm_kind=cfg.norm)
    else:
        body = ResNet(depth=int(cfg.backbone[6:]), ndim=cfg.ndim, in_channels=cfg.in_channels,
                      base_width=cfg.base_width, norm_kind=cfg.norm)
    return Trunk(body, cfg.stage)


def _feature_size(trunk: nn.Module, cfg: LocalizerConfig) -> tuple[int, ...]:
    """The trunk's feature grid for one window (a dry run on zeros, without touching BatchNorm statistics)."""
    was = trunk.training
    trunk.eval()
    with torch.no_grad():
        f = trunk(torch.zeros(1, cfg.in_channels, *(cfg.window,) * cfg.ndim))
    trunk.train(was)
    return tuple(int(n) for n in f.shape[2:])


class Localizer(nn.Module):
    """One window -> class logits ``[B, K + 1]`` and boxes ``[B, K, 2d]`` (window pixels; a class-agnostic head
    repeats its one box for every class).

    ``forward(images, targets=None)``: ``images`` ``[B, C, *(window,) * d]`` (normalised); ``targets`` one dict per
    window ``{"boxes": [1 or 0, 2d] (window pixels), "labels": [1 or 0] in 0..K-1}`` (empty: a background window,
    no box loss). Returns ``{"logits", "boxes"}`` and, with targets, ``"losses": {"loss_cls", "loss_box"}``:
    cross-entropy over K + 1 classes (mean over windows) and ``box_weight`` x the box loss of the true class's box
    (summed over the 2d coordinates, mean over object windows). ``trunk``: a ready-built trunk (a module with
    ``channels`` and ``stride``) instead of the config's backbone."""

    def __init__(self, config: LocalizerConfig, *, trunk: nn.Module | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.trunk = trunk if trunk is not None else build_trunk(config)
        stride = tuple(self.trunk.stride) if isinstance(self.trunk.stride, (tuple, list)) else \
            (int(self.trunk.stride),) * config.ndim
        if any(config.window % s for s in stride):
            raise ValueError(f"localizer.window must be a multiple of the trunk's stride {stride}, got "
                             f"{config.window}")
        self.stride = stride
        self.feature_size = _feature_size(self.trunk, config)
        if min(self.feature_size) < 1:
            raise ValueError(f"localizer.window {config.window} is too small for the trunk (no features left)")
        d, k = config.ndim, config.num_classes
        self.num_box = 1 if config.class_agnostic else k
        c = self.trunk.channels
        self.fc6 = nn.Linear(c * math.prod(self.feature_size), config.hidden)
        self.fc7 = nn.Linear(config.hidden, config.hidden)
        self.cls = nn.Linear(config.hidden, k + 1)
        self.box = nn.Linear(config.hidden, 2 * d * self.num_box)
        self.drop = nn.Dropout(config.dropout)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)
        nn.init.normal_(self.box.weight, std=0.001)
        with torch.no_grad():  # start every box at the window's central half, a typical object window
            self.box.bias.copy_(torch.tensor([0.25] * d + [0.75] * d).repeat(self.num_box))

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk features ``[B, C, *k]`` -> logits ``[B, K + 1]``, normalised boxes ``[B, K, 2d]``."""
        x = self.drop(F.relu(self.fc6(features.flatten(1))))
        x = self.drop(F.relu(self.fc7(x)))
        b = self.box(x).reshape(x.shape[0], self.num_box, 2 * self.config.ndim)  # [B, K or 1, 2d]
        return self.cls(x), b.expand(-1, self.config.num_classes, -1)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        want = (cfg.in_channels,) + (cfg.window,) * cfg.ndim
        if images.dim() != cfg.ndim + 2 or tuple(images.shape[1:]) != want:
            raise ValueError(f"Localizer expects images of shape [B, {', '.join(map(str, want))}], got "
                             f"{tuple(images.shape)}")
        logits, boxes = self.head(self.trunk(images))
        out = {"logits": logits, "boxes": boxes * cfg.window}
        if targets is not None:
            out["losses"] = self.losses(logits, boxes, targets)
        return out

    def losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses of a batch (see the class docstring); ``boxes`` normalised ``[B, K, 2d]``."""
        b, d2 = logits.shape[0], boxes.shape[-1]
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for {b} windows")
        zero_l = torch.zeros(1, dtype=torch.long, device=logits.device)
        zero_b = torch.zeros(1, d2, device=logits.device)
        # One row per window: its label + 1 (0 = background) and its box (zeros for background; shapes are host
        # metadata, so this builds without a device sync).
        labels = torch.cat([t["labels"].reshape(-1)[:1].long() + 1 if t["labels"].numel() else zero_l
                            for t in targets])  # [B]
        tboxes = torch.cat([t["boxes"].reshape(-1, d2)[:1].float() if t["boxes"].numel() else zero_b
                            for t in targets]) / self.config.window  # [B, 2d]
        loss_cls = F.cross_entropy(logits.float(), labels)
        obj = (labels > 0).float()  # [B]
        pred = boxes[torch.arange(b, device=boxes.device), (labels - 1).clamp(min=0)].float()  # [B, 2d]
        if self.config.box_loss == "smooth_l1":
            per = smooth_l1_loss(pred, tboxes, beta=SMOOTH_L1_BETA, reduction="none").sum(1)
        else:
            per = (pred - tboxes).pow(2).sum(1)
        loss_box = self.config.box_weight * (per * obj).sum() / obj.sum().clamp(min=1.0)
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def fully_convolutional(self) -> "OverFeatNet":
        """The same network with fc6 as a convolution over ``feature_size`` and fc7 / heads as 1x1 convolutions
        (weights copied and reshaped; the trunk copied), in this module's train/eval mode."""
        d, h = self.config.ndim, self.config.hidden
        Conv = conv(d)
        c = self.trunk.channels
        net = OverFeatNet(config=self.config, trunk=copy.deepcopy(self.trunk), stride=self.stride,
                          feature_size=self.feature_size,
                          fc6=Conv(c, h, self.feature_size), fc7=Conv(h, h, 1),
                          cls=Conv(h, self.cls.out_features, 1), box=Conv(h, self.box.out_features, 1))
        with torch.no_grad():
            # fc6's input is features.flatten(1) of [B, C, *k]: the weight [H, C * prod(k)] is a [H, C, *k] kernel
            net.fc6.weight.copy_(self.fc6.weight.reshape(h, c, *self.feature_size))
            for fc_name in ("fc6", "fc7", "cls", "box"):
                fc, cv = getattr(self, fc_name), getattr(net, fc_name)
                if fc_name != "fc6":
                    cv.weight.copy_(fc.weight.reshape(*fc.weight.shape, *(1,) * d))
                cv.bias.copy_(fc.bias)
        return net.to(self.fc6.weight.device).train(self.training)


class OverFeatNet(nn.Module):
    """A :class:`Localizer` made fully convolutional (build it with :meth:`Localizer.fully_convolutional`).

    ``forward(images [B, C, *S])`` -> ``{"logits": [B, K + 1, *M], "boxes": [B, K, 2d, *M]}`` with ``M_a = F_a -
    k_a + 1`` (``F`` the trunk's grid of the input): location ``i`` is the window with corner ``i * stride``, its
    boxes in that window's pixels (add ``i * stride`` for input pixels)."""

    def __init__(self, *, config: LocalizerConfig, trunk: nn.Module, stride: tuple[int, ...],
                 feature_size: tuple[int, ...], fc6: nn.Module, fc7: nn.Module, cls: nn.Module, box: nn.Module):
        super().__init__()
        self.config, self.trunk, self.stride, self.feature_size = config, trunk, tuple(stride), tuple(feature_size)
        self.fc6, self.fc7, self.cls, self.box = fc6, fc7, cls, box
        self.drop = nn.Dropout(config.dropout)

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk features ``[B, C, *F]`` -> logits ``[B, K + 1, *M]``, normalised boxes ``[B, K, 2d, *M]``."""
        cfg = self.config
        x = self.drop(F.relu(self.fc6(features)))
        x = self.drop(F.relu(self.fc7(x)))
        b = self.box(x)  # [B, (K or 1) * 2d, *M]
        b = b.reshape(b.shape[0], -1, 2 * cfg.ndim, *b.shape[2:]).expand(-1, cfg.num_classes, -1,
                                                                          *b.shape[2:])
        return self.cls(x), b

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        if images.dim() != cfg.ndim + 2 or images.shape[1] != cfg.in_channels:
            raise ValueError(f"OverFeatNet expects images of shape [B, {cfg.in_channels}, *spatial] with "
                             f"{cfg.ndim} spatial dims, got {tuple(images.shape)}")
        if any(n < cfg.window for n in images.shape[2:]):
            raise ValueError(f"OverFeatNet needs inputs of at least the window ({cfg.window}) per axis, got "
                             f"{tuple(images.shape)}")
        logits, boxes = self.head(self.trunk(images))
        return {"logits": logits, "boxes": boxes * cfg.window}


def build_localizer(cfg: LocalizerConfig) -> Localizer:
    return Localizer(cfg)
