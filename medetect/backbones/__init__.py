"""Backbones for any number of spatial dims and input channels, and their pretrained starts
(:mod:`medetect.backbones.pretrained`)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .efficientnet import EfficientNetLite0
from .resnet import RESNET_DEPTHS, ResNet
from .vgg import VGG16

__all__ = ["ResNet", "VGG16", "EfficientNetLite0", "BACKBONES", "build_backbone"]

BACKBONES = tuple(f"resnet{d}" for d in RESNET_DEPTHS) + ("vgg16", "efficientnet_lite0")


def build_backbone(name: str, *, ndim: int, in_channels: int, base_width: int, norm_kind: str,
                   stem_stride: int | Sequence[int] = 2) -> nn.Module:
    """A backbone by config name. Every one has ``forward(x, up_to) -> {"c{i}": ...}``, ``levels`` (the ``i``
    it offers) and, per level, ``out_channels`` and per-axis ``strides`` (VGG-16 has no stem stride)."""
    if name == "vgg16":
        return VGG16(ndim=ndim, in_channels=in_channels, base_width=base_width, norm_kind=norm_kind)
    if name == "efficientnet_lite0":
        return EfficientNetLite0(ndim=ndim, in_channels=in_channels, base_width=base_width, norm_kind=norm_kind,
                                 stem_stride=stem_stride)
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in RESNET_DEPTHS:
        return ResNet(depth=int(name[6:]), ndim=ndim, in_channels=in_channels, base_width=base_width,
                      norm_kind=norm_kind, stem_stride=stem_stride)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
