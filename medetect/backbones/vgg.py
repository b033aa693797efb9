"""VGG-16 (Simonyan & Zisserman 2015) for any d, as in the lecture's mammography Faster R-CNN (Ribli et al. 2018).

Five stages of 3x3 convolutions (2, 2, 3, 3, 3 layers) with max pooling; returns ``{"c3", "c4", "c5"}`` at strides
4, 8, 16 (the classic Faster R-CNN VGG-16 uses conv5_3 at stride 16, without the fifth pooling).
``base_width`` scales the channels (64 in the paper). Optional normalisation (none in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.nd import conv, max_pool, norm

__all__ = ["VGG16"]


class VGG16(nn.Module):
    LAYERS = (2, 2, 3, 3, 3)

    def __init__(self, *, ndim: int = 2, in_channels: int = 3, base_width: int = 64, norm_kind: str = "group"):
        super().__init__()
        Conv = conv(ndim)
        widths = [base_width, base_width * 2, base_width * 4, base_width * 8, base_width * 8]
        cin = in_channels
        stages = []
        for i, (n, w) in enumerate(zip(self.LAYERS, widths)):
            mods: list[nn.Module] = [max_pool(ndim)(2, 2)] if 0 < i else []
            for _ in range(n):
                mods += [Conv(cin, w, 3, padding=1), norm(norm_kind, ndim, w), nn.ReLU(inplace=True)]
                cin = w
            stages.append(nn.Sequential(*mods))
        self.stages = nn.ModuleList(stages)
        self.ndim = ndim
        self.levels = (3, 4, 5)
        self.out_channels = widths[2:]
        self.strides = [(4,) * ndim, (8,) * ndim, (16,) * ndim]

    def forward(self, x: torch.Tensor, up_to: int = 5) -> dict[str, torch.Tensor]:
        out = {}
        for i, stage in enumerate(self.stages[:up_to]):
            x = stage(x)
            if i >= 2:
                out[f"c{i + 1}"] = x
        return out
