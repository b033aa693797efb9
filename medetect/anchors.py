"""Anchor boxes for any number of spatial dims, as in the Faster R-CNN RPN (Ren et al. 2015).

Shape key
    A        anchors per location (the same A shapes at every location of a level)
    S_1..S_d feature-map size of a level
    d        spatial dims

Each level has a stride (input voxels per feature cell, per axis) and A anchor shapes (extent per axis, array
order). Anchors are centred on the CENTRE of each feature cell, ``(i + 0.5) * stride`` in our half-open edge
coordinates (torchvision centres them at ``i * stride``, an artefact of its pixel-corner convention). The anchors of a
level are ordered location-major, anchor-minor: index = ``flat_location * A + a``, which is the order a head output
``[B, A * k, *S]`` gives after ``.view(B, A, k, *S).movedim(2, -1)`` -> ``permute`` to ``[B, *S, A, k]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["AnchorGenerator", "anchor_shapes_2d"]


def anchor_shapes_2d(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> list[tuple[float, float]]:
    """2D anchor shapes ``(h, w)`` from sizes x aspect ratios (ratio = h / w, area = size**2), as in the RPN paper."""
    shapes = []
    for r in aspect_ratios:
        if r <= 0:
            raise ValueError(f"aspect_ratios must be positive, got {r}")
        for s in sizes:
            if s <= 0:
                raise ValueError(f"sizes must be positive, got {s}")
            shapes.append((s * math.sqrt(r), s / math.sqrt(r)))
    return shapes


class AnchorGenerator(nn.Module):
    """Anchors per feature level.

    Args (keyword-only):
        shapes: per level, a list of A anchor shapes, each a d-tuple of extents (array order, input voxels).
        strides: per level, the stride (int for all axes, or a d-tuple).
    Use :meth:`from_sizes` for the 2D "sizes x aspect ratios" form or isotropic (cubic) anchors in any d.
    """

    def __init__(self, *, shapes: Sequence[Sequence[Sequence[float]]], strides: Sequence[int | Sequence[int]]):
        super().__init__()
        if len(shapes) == 0 or len(shapes) != len(strides):
            raise ValueError(f"shapes and strides need one entry per level, got {len(shapes)} and {len(strides)}")
        d = len(shapes[0][0])
        self.ndim = d
        self.strides: list[tuple[int, ...]] = []
        for lvl, (sh, st) in enumerate(zip(shapes, strides)):
            if len(sh) == 0 or any(len(s) != d for s in sh):
                raise ValueError(f"shapes[{lvl}] must be a non-empty list of {d}-tuples, got {sh}")
            st = (int(st),) * d if isinstance(st, (int, float)) else tuple(int(x) for x in st)
            if len(st) != d or min(st) <= 0:
                raise ValueError(f"strides[{lvl}] must be a positive int or a {d}-tuple, got {st}")
            self.strides.append(st)
            # [A, d] extents of this level's anchors, kept as a buffer so .to(device) moves it.
            self.register_buffer(f"shapes_{lvl}", torch.tensor(sh, dtype=torch.float32), persistent=False)
        self.num_levels = len(shapes)
        self.num_anchors_per_location = [len(s) for s in shapes]

    @classmethod
    def from_sizes(
        cls,
        *,
        sizes: Sequence[Sequence[float]],
        strides: Sequence[int | Sequence[int]],
        aspect_ratios: Sequence[float] | None = None,
        ndim: int = 2,
    ) -> "AnchorGenerator":
        """Per level ``sizes``; in 2D with ``aspect_ratios`` (h/w) the RPN's sizes x ratios, else cubes in ``ndim``."""
        if aspect_ratios is not None:
            if ndim != 2:
                raise ValueError("aspect_ratios are defined for 2D; give explicit shapes for 3D anchors")
            shapes = [anchor_shapes_2d(s, aspect_ratios) for s in sizes]
        else:
            shapes = [[(float(x),) * ndim for x in s] for s in sizes]
        return cls(shapes=shapes, strides=strides)

    def level_anchors(self, level: int, size: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        """Anchors ``[prod(S) * A, 2d]`` of one level for a feature map of spatial size ``S``."""
        d = self.ndim
        if len(size) != d:
            raise ValueError(f"feature map of level {level} must have {d} spatial dims, got size {tuple(size)}")
        shapes = getattr(self, f"shapes_{level}").to(device=device, dtype=dtype)  # [A, d]
        stride = torch.tensor(self.strides[level], device=device, dtype=dtype)  # [d]
        axes = [torch.arange(s, device=device, dtype=dtype) for s in size]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, d)  # [L, d] cell indices
        centres = (grid + 0.5) * stride  # [L, d]
        half = shapes * 0.5  # [A, d]
        lo = centres[:, None, :] - half[None]  # [L, A, d]
        hi = centres[:, None, :] + half[None]
        return torch.cat([lo, hi], dim=-1).reshape(-1, 2 * d)  # [L * A, 2d]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors per level for feature maps ``[B, C, *S]`` (one per level): a list of ``[prod(S) * A, 2d]``."""
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(features)}")
        return [
            self.level_anchors(i, f.shape[2:], device=f.device, dtype=torch.float32) for i, f in enumerate(features)
        ]
