"""Dimension lookup for torch layers: one model definition serves 1D, 2D and 3D.

``conv(d)`` returns ``nn.Conv{d}d`` and so on; ``norm(kind, d, channels)`` builds a normalisation layer. GroupNorm is
the default for detectors trained from scratch: medical batches are small (a few 3D patches), where BatchNorm
statistics are noisy (Wu & He 2018).
"""

from __future__ import annotations

from torch import nn

__all__ = ["conv", "conv_transpose", "max_pool", "avg_pool", "batch_norm", "norm", "NORM_KINDS"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
NORM_KINDS = ("group", "batch", "instance", "none")


def _pick(table: dict, d: int, what: str):
    if d not in table:
        raise ValueError(f"{what} supports 1, 2 or 3 spatial dims, got {d}")
    return table[d]


def conv(d: int) -> type[nn.Module]:
    return _pick(_CONV, d, "conv")


def conv_transpose(d: int) -> type[nn.Module]:
    return _pick(_CONVT, d, "conv_transpose")


def max_pool(d: int) -> type[nn.Module]:
    return _pick(_MAXPOOL, d, "max_pool")


def avg_pool(d: int) -> type[nn.Module]:
    return _pick(_AVGPOOL, d, "avg_pool")


def batch_norm(d: int) -> type[nn.Module]:
    return _pick(_BN, d, "batch_norm")


def norm(kind: str, d: int, channels: int, groups: int = 32) -> nn.Module:
    """A normalisation layer over ``channels``: 'group' (GroupNorm, groups reduced to divide channels), 'batch',
    'instance' or 'none' (identity)."""
    if kind == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    if kind == "batch":
        return batch_norm(d)(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
