"""EfficientNet-Lite0 (Tan & Le, ICML 2019; the Lite variant of the TensorFlow model garden) for any d.

The Lite variant is EfficientNet-B0 made friendly to quantisation: MBConv blocks (1x1 expansion, depthwise k x k,
1x1 projection; Sandler et al. 2018) with ReLU6 instead of swish and without squeeze-excitation; the stem (32
channels) and head are not scaled. Convolutions pad like TensorFlow's ``SAME`` (a stride-2 layer pads more at the
high end when the size is even), so ImageNet weights trained in TensorFlow give their own features; BatchNorm eps
is TensorFlow's 1e-3.

Returns ``{"c2": stride 4 (24 ch), "c3": 8 (40), "c4": 16 (112), "c5": 32 (320)}`` like :class:`ResNet` (the
stride of the stem times 2, 4, 8, 16; the 1x1 head conv to 1280 channels belongs to the classifier and is left out).
``base_width / 64`` scales the channels of every block (64: the published model; channels rounded to multiples of
8). Parameter names: ``stem.0.conv.weight``, ``stem.1.*`` (norm), ``blocks.{i}.{expand, depthwise, project}.0.conv
.weight`` and ``....1.*`` (norm); :mod:`medetect.backbones.pretrained` maps the published state dict onto them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.nd import conv, norm

__all__ = ["EfficientNetLite0", "LITE0_BLOCKS", "BN_EPS"]

# (repeats, kernel, stride, expansion, output channels) per stage (the published Lite0 = B0 block list)
LITE0_BLOCKS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_LEVEL_STAGES = {2: 1, 3: 2, 4: 4, 5: 6}  # c2..c5 = the outputs of these stages (strides 4, 8, 16, 32)
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the published weights were trained with
STEM_CHANNELS = 32


def _round(channels: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never below 90% of ``channels`` (EfficientNet's rule)."""
    out = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * channels else out


class SameConv(nn.Module):
    """A convolution of any d padded like TensorFlow's ``SAME``: output size ``ceil(size / stride)``, the padding
    ``max((out - 1) * stride + k - size, 0)`` split with the extra voxel at the high end. Stride 1 pads symmetrically
    in the convolution itself (odd kernels)."""

    def __init__(self, ndim: int, cin: int, cout: int, kernel: int, stride: int | Sequence[int] = 1, groups: int = 1):
        super().__init__()
        self.stride = (stride,) * ndim if isinstance(stride, int) else tuple(int(s) for s in stride)
        if len(self.stride) != ndim:
            raise ValueError(f"stride must be an int or {ndim} per-axis ints, got {stride}")
        self.kernel = kernel
        static = all(s == 1 for s in self.stride)
        self.conv = conv(ndim)(cin, cout, kernel, stride=self.stride, padding=kernel // 2 if static else 0,
                               groups=groups, bias=False)
        self.static = static

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static:
            pad: list[int] = []
            for size, s in zip(reversed(x.shape[2:]), reversed(self.stride)):  # F.pad wants the last axis first
                total = max((math.ceil(size / s) - 1) * s + self.kernel - size, 0)
                pad += [total // 2, total - total // 2]
            x = F.pad(x, pad)
        return self.conv(x)


def _conv_norm(ndim: int, cin: int, cout: int, kernel: int, stride, norm_kind: str, *, groups: int = 1,
               act: bool = True) -> nn.Sequential:
    mods: list[nn.Module] = [SameConv(ndim, cin, cout, kernel, stride, groups=groups),
                             norm(norm_kind, ndim, cout, eps=BN_EPS)]
    if act:
        mods.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*mods)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: ``[1x1 expand -> norm -> ReLU6] -> depthwise k x k
    (stride) -> norm -> ReLU6 -> 1x1 project -> norm``, plus the input when stride 1 and channels are unchanged."""

    def __init__(self, cin: int, cout: int, *, kernel: int, stride: int, expansion: int, ndim: int, norm_kind: str):
        super().__init__()
        mid = cin * expansion
        self.expand = _conv_norm(ndim, cin, mid, 1, 1, norm_kind) if expansion != 1 else None
        self.depthwise = _conv_norm(ndim, mid, mid, kernel, stride, norm_kind, groups=mid)
        self.project = _conv_norm(ndim, mid, cout, 1, 1, norm_kind, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, *, ndim: int = 2, in_channels: int = 3, base_width: int = 64, norm_kind: str = "batch",
                 stem_stride: int | Sequence[int] = 2):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        s0 = (stem_stride,) * ndim if isinstance(stem_stride, int) else tuple(int(s) for s in stem_stride)
        if len(s0) != ndim:
            raise ValueError(f"stem_stride must be an int or {ndim} per-axis ints, got {stem_stride}")
        scale = base_width / 64
        self.ndim = ndim
        cin = _round(STEM_CHANNELS * scale)
        self.stem = _conv_norm(ndim, in_channels, cin, 3, s0, norm_kind)
        blocks, ends, factor = [], {}, 1
        for stage, (repeats, k, stride, e, cout) in enumerate(LITE0_BLOCKS):
            cout = _round(cout * scale)
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, kernel=k, stride=stride if j == 0 else 1, expansion=e, ndim=ndim,
                                     norm_kind=norm_kind))
                cin = cout
            factor *= stride
            ends[stage] = (len(blocks), cout, factor)
        self.blocks = nn.ModuleList(blocks)
        self.levels = tuple(_LEVEL_STAGES)
        self.ends = {lv: ends[st][0] for lv, st in _LEVEL_STAGES.items()}  # c{lv} = output of blocks[: ends[lv]]
        self.out_channels = [ends[st][1] for st in _LEVEL_STAGES.values()]
        self.strides = [tuple(s * ends[st][2] for s in s0) for st in _LEVEL_STAGES.values()]
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # He init over each group's fan-out (TF's rule)
                fan_out = m.out_channels // m.groups * m.weight[0, 0].numel()
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: torch.Tensor, up_to: int = 5) -> dict[str, torch.Tensor]:
        """Feature maps ``c2 .. c{up_to}``; blocks past the deepest level asked for are not run."""
        x = self.stem(x)
        out = {}
        done = 0
        for lv in range(2, up_to + 1):
            for block in self.blocks[done: self.ends[lv]]:
                x = block(x)
            done = self.ends[lv]
            out[f"c{lv}"] = x
        return out
