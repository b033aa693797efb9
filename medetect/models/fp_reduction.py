"""Stage two of a two-stage nodule detector: a CNN that classifies cubes centred at candidates (nodule vs not).

The false-positive-reduction (FPR) classifier of LUNA16 systems (Setio et al. 2016; Dou et al. 2017): a cube of
``cube_size`` voxels per axis, resampled to isotropic spacing around each candidate, goes through a few conv stages
(conv - GroupNorm - ReLU, residual, stride-2 between stages), global average + max pooling and a linear layer to ONE
logit. The same definition serves any d (3D cubes for CT, 2D patches for pictures) through :mod:`medetect.layers.nd`.

Multi-scale input (Dou et al. 2017 use three fields of view): the cubes of several fields of view, each resampled
to the same ``cube_size``, are stacked as input channels (``in_channels = len(scales)``) of one network. Dou et al.
train one network per scale and average their probabilities; the channel-stacked variant is cheaper and is what this
module implements.

``forward(cubes, targets=None)`` returns ``{"logits": [B], "losses": {"fpr_bce": ...}}`` (losses only with targets)
so the model trains with :class:`medetect.engine.trainer.Trainer`. ``targets`` is a label tensor ``[B]`` (1 nodule,
0 not) or a list of dicts ``{"label": scalar tensor}`` (what :func:`medetect.luna.fpr.cube_collate` produces).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.nd import NORM_KINDS, conv, norm
from ..schema import check, option

__all__ = ["FPRConfig", "FPRClassifier", "build_fpr"]


@dataclass
class FPRConfig:
    ndim: int = option(3, doc="spatial dims of the cubes", choices=(1, 2, 3))
    in_channels: int = option(1, doc="input channels: one per field of view (must equal the number of scales)", ge=1)
    widths: list[int] = option([16, 32, 64], doc="channels per stage; stride 2 between stages", ge=1)
    stem_width: int = option(16, doc="channels of the stem convolution", ge=1)
    norm: str = option("group", doc="normalisation layer (see medetect.layers.nd.norm)",
                       choices=NORM_KINDS)
    groups: int = option(8, doc="GroupNorm groups", ge=1)
    dropout: float = option(0.2, doc="dropout before the final linear layer", ge=0, lt=1)
    pos_weight: float = option(1.0, doc="BCE weight of the positive class (1 when the sampler balances classes)", gt=0)
    label_smoothing: float = option(0.0, doc="label smoothing of the BCE targets", ge=0, lt=1)
    # what the cubes are (carried with the weights; used by medetect.luna.fpr to extract matching cubes)
    cube_size: int = option(32, doc="voxels per cube axis", ge=1)
    spacing_mm: float = option(1.0, doc="isotropic voxel size (mm) of the finest scale", gt=0)
    scales: list[float] = option([1.0], doc="fields of view as multiples of cube_size * spacing_mm (one channel "
                                 "each)", gt=0)
    hu_window: list[float] = option([-1000.0, 400.0], doc="HU window [lo, hi] mapped to [0, 1] (lung window)")

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, prefix: str = "fpr") -> None:
        """Ranges of every key plus the cross-field rules (channels = scales, cube size vs stages, HU lo < hi)."""
        check(self, prefix)
        if self.in_channels != len(self.scales):
            raise ValueError(f"{prefix}.in_channels ({self.in_channels}) must equal the number of {prefix}.scales "
                             f"{self.scales}")
        if not self.widths:
            raise ValueError(f"{prefix}.widths must be a non-empty list of positive ints, got []")
        if self.cube_size < 2 ** (len(self.widths) - 1):
            raise ValueError(f"{prefix}.cube_size {self.cube_size} is too small for {len(self.widths)} stages "
                             f"(needs >= {2 ** (len(self.widths) - 1)})")
        if len(self.hu_window) != 2 or not self.hu_window[1] > self.hu_window[0]:
            raise ValueError(f"{prefix}.hu_window must be [lo, hi] with lo < hi, got {self.hu_window}")


class _Block(nn.Module):
    """Residual block: conv(stride) - norm - relu - conv - norm, plus a (projected) skip, then relu."""

    def __init__(self, cin: int, cout: int, stride: int, d: int, norm_kind: str, groups: int):
        super().__init__()
        C = conv(d)
        self.body = nn.Sequential(
            C(cin, cout, 3, stride=stride, padding=1, bias=False), norm(norm_kind, d, cout, groups), nn.ReLU(inplace=True),
            C(cout, cout, 3, padding=1, bias=False), norm(norm_kind, d, cout, groups),
        )
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            C(cin, cout, 1, stride=stride, bias=False), norm(norm_kind, d, cout, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class FPRClassifier(nn.Module):
    """Cube classifier: ``[B, C, *S] -> {"logits": [B], "losses": {...}}`` (module docstring)."""

    def __init__(self, config: FPRConfig | None = None):
        super().__init__()
        cfg = config or FPRConfig()
        cfg.validate()
        self.config = cfg
        d = cfg.ndim
        self.stem = nn.Sequential(conv(d)(cfg.in_channels, cfg.stem_width, 3, padding=1, bias=False),
                                  norm(cfg.norm, d, cfg.stem_width, cfg.groups), nn.ReLU(inplace=True))
        stages, cin = [], cfg.stem_width
        for i, w in enumerate(cfg.widths):
            stages.append(_Block(cin, w, 1 if i == 0 else 2, d, cfg.norm, cfg.groups))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(2 * cin, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _labels(targets, b: int, device) -> torch.Tensor:
        if isinstance(targets, torch.Tensor):
            y = targets
        else:
            if len(targets) != b:
                raise ValueError(f"targets must have one entry per cube ({b}), got {len(targets)}")
            y = torch.stack([torch.as_tensor(t["label"]).reshape(()) for t in targets])
        y = y.reshape(-1).to(device=device, dtype=torch.float32)
        if y.numel() != b:
            raise ValueError(f"targets must hold one label per cube ({b}), got {y.numel()}")
        return y

    def forward(self, cubes: torch.Tensor, targets=None) -> dict:
        cfg = self.config
        if cubes.ndim != cfg.ndim + 2 or cubes.shape[1] != cfg.in_channels:
            raise ValueError(f"cubes must have shape [B, {cfg.in_channels}, *{cfg.ndim} sizes], got {tuple(cubes.shape)}")
        x = self.stages(self.stem(cubes))
        x = torch.cat([x.flatten(2).mean(-1), x.flatten(2).amax(-1)], dim=1)
        logits = self.fc(self.drop(x)).squeeze(-1)
        out = {"logits": logits, "losses": {}}
        if targets is not None:
            y = self._labels(targets, cubes.shape[0], logits.device)
            if cfg.label_smoothing:
                y = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            pw = torch.as_tensor(cfg.pos_weight, dtype=logits.dtype, device=logits.device)
            out["losses"]["fpr_bce"] = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pw.float())
        return out


def build_fpr(config: FPRConfig | dict | None = None) -> FPRClassifier:
    if isinstance(config, dict):
        config = FPRConfig(**config)
    return FPRClassifier(config)
