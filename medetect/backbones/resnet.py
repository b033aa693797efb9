"""ResNet-18/34/50 (He et al., CVPR 2016) for any d and any number of input channels, trained from scratch.

Returns a dict of feature maps ``{"c2": stride 4, "c3": 8, "c4": 16, "c5": 32}`` (per axis, times ``stem_stride`` /
pooling choices below). ``base_width`` scales every stage (64 is the paper; 16-32 suits CPU training and small data).
``stem_stride`` lets anisotropic 3D CT keep its thin axis: e.g. ``(1, 2, 2)`` for 5 mm slices.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..layers.nd import conv, max_pool, norm

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet", "RESNET_DEPTHS"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride, *, ndim: int, norm_kind: str):
        super().__init__()
        Conv = conv(ndim)
        cout = width * self.expansion
        self.body = nn.Sequential(
            Conv(cin, width, 3, stride=stride, padding=1, bias=False), norm(norm_kind, ndim, width), nn.ReLU(inplace=True),
            Conv(width, cout, 3, padding=1, bias=False), norm(norm_kind, ndim, cout),
        )
        self.skip = _skip(cin, cout, stride, ndim, norm_kind)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride, *, ndim: int, norm_kind: str):
        super().__init__()
        Conv = conv(ndim)
        cout = width * self.expansion
        self.body = nn.Sequential(
            Conv(cin, width, 1, bias=False), norm(norm_kind, ndim, width), nn.ReLU(inplace=True),
            Conv(width, width, 3, stride=stride, padding=1, bias=False), norm(norm_kind, ndim, width), nn.ReLU(inplace=True),
            Conv(width, cout, 1, bias=False), norm(norm_kind, ndim, cout),
        )
        self.skip = _skip(cin, cout, stride, ndim, norm_kind)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


def _skip(cin: int, cout: int, stride, ndim: int, norm_kind: str) -> nn.Module:
    if cin == cout and (stride == 1 or all(s == 1 for s in (stride if isinstance(stride, tuple) else (stride,)))):
        return nn.Identity()
    return nn.Sequential(conv(ndim)(cin, cout, 1, stride=stride, bias=False), norm(norm_kind, ndim, cout))


RESNET_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    def __init__(
        self,
        *,
        depth: int = 18,
        ndim: int = 2,
        in_channels: int = 3,
        base_width: int = 64,
        norm_kind: str = "group",
        stem_stride: int | Sequence[int] = 2,
        stem_pool: bool = True,
    ):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        block, layers = RESNET_DEPTHS[depth]
        Conv = conv(ndim)
        self.ndim = ndim
        self.stem = nn.Sequential(
            Conv(in_channels, base_width, 7, stride=stem_stride, padding=3, bias=False),
            norm(norm_kind, ndim, base_width),
            nn.ReLU(inplace=True),
            max_pool(ndim)(3, stride=2, padding=1) if stem_pool else nn.Identity(),
        )
        cin = base_width
        stages = []
        for i, n in enumerate(layers):
            width = base_width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, ndim=ndim, norm_kind=norm_kind))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.levels = (2, 3, 4, 5)
        self.out_channels = [base_width * 2**i * block.expansion for i in range(4)]
        s0 = (stem_stride,) * ndim if isinstance(stem_stride, int) else tuple(int(s) for s in stem_stride)
        if len(s0) != ndim:
            raise ValueError(f"stem_stride must be an int or {ndim} per-axis ints, got {stem_stride}")
        # Per-axis stride of c2..c5 (the pooling and stage strides are isotropic; the stem may not be).
        self.strides = [tuple(s * (2 if stem_pool else 1) * 2**i for s in s0) for i in range(4)]
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, up_to: int = 5) -> dict[str, torch.Tensor]:
        """Feature maps ``c2 .. c{up_to}``; deeper stages are not computed (a 3D detector using c2-c3 skips c4-c5)."""
        x = self.stem(x)
        out = {}
        for i, stage in enumerate(self.stages[: max(0, up_to - 1)]):
            x = stage(x)
            out[f"c{i + 2}"] = x
        return out


def resnet(depth: int, **kw) -> ResNet:
    return ResNet(depth=depth, **kw)
