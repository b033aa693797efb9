"""Backbones for any number of spatial dims and input channels."""

from .resnet import ResNet
from .vgg import VGG16

__all__ = ["ResNet", "VGG16"]
