"""Feature Pyramid Network (Lin et al., CVPR 2017) for any d.

Shape key: B batch, C channels, S_1..S_d spatial. Input: backbone maps ordered fine -> coarse; output: the same number
of maps (plus ``extra_levels`` max-pooled ones) with ``out_channels`` each.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nd import conv, max_pool, norm

__all__ = ["FPN"]


class FPN(nn.Module):
    def __init__(self, *, in_channels: Sequence[int], out_channels: int, ndim: int, extra_levels: int = 0, norm_kind: str = "none"):
        super().__init__()
        Conv = conv(ndim)
        self.ndim = ndim
        self.lateral = nn.ModuleList([Conv(c, out_channels, 1) for c in in_channels])
        self.output = nn.ModuleList(
            [nn.Sequential(Conv(out_channels, out_channels, 3, padding=1), norm(norm_kind, ndim, out_channels)) for _ in in_channels]
        )
        self.extra = nn.ModuleList([max_pool(ndim)(kernel_size=1, stride=2) for _ in range(extra_levels)])
        self.out_channels = out_channels

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        outs = [None] * len(lat)
        top = lat[-1]
        outs[-1] = self.output[-1](top)
        for i in range(len(lat) - 2, -1, -1):
            top = lat[i] + F.interpolate(top, size=lat[i].shape[2:], mode="nearest")
            outs[i] = self.output[i](top)
        for pool in self.extra:
            outs.append(pool(outs[-1]))
        return outs
