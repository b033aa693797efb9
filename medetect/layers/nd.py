"""Dimension lookup for torch layers: one model definition serves 1D, 2D and 3D.

``conv(d)`` returns ``nn.Conv{d}d`` and so on; ``norm(kind, d, channels)`` builds a normalisation layer. GroupNorm is
the default for detectors trained from scratch: medical batches are small (a few 3D patches), where BatchNorm
statistics are noisy (Wu & He 2018). :class:`FrozenBatchNorm` (``freeze_batch_norm``) is BatchNorm with fixed
statistics and affine, for a backbone started from pretrained weights (as torchvision's detection models do).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv", "conv_transpose", "max_pool", "avg_pool", "batch_norm", "norm", "NORM_KINDS", "FrozenBatchNorm",
           "freeze_batch_norm"]

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


def norm(kind: str, d: int, channels: int, groups: int = 32, eps: float = 1e-5) -> nn.Module:
    """A normalisation layer over ``channels``: 'group' (GroupNorm, groups reduced to divide channels), 'batch',
    'instance' or 'none' (identity). ``eps``: added to the variance (TensorFlow-trained weights use 1e-3)."""
    if kind == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels, eps=eps)
    if kind == "batch":
        return batch_norm(d)(channels, eps=eps)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


class FrozenBatchNorm(nn.Module):
    """BatchNorm of any d with fixed statistics and affine: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per
    channel, the same in train and eval mode. All four are buffers (not trained); the state-dict keys are BatchNorm's
    (``weight``, ``bias``, ``running_mean``, ``running_var``), so a BatchNorm state dict loads into it."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm's counter: nothing to count here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> int:
    """In place: replace every BatchNorm (1D/2D/3D) inside ``module`` by a :class:`FrozenBatchNorm` holding its current
    statistics and affine; returns how many were replaced. Only for pretrained weights: frozen random statistics
    would never adapt."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                if not child.track_running_stats:
                    raise ValueError("freeze_batch_norm needs BatchNorm layers with running statistics")
                frozen = FrozenBatchNorm(child.num_features, eps=child.eps).to(child.running_mean.device)
                with torch.no_grad():
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                    if child.affine:
                        frozen.weight.copy_(child.weight)
                        frozen.bias.copy_(child.bias)
                setattr(parent, name, frozen)
                n += 1
    return n
