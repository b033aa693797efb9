"""Training augmentation of the organ localiser: the real CTs it must work on differ from any training set in body
shape, organ shape, field of view, scanner noise and reconstruction kernel, contrast phase and HU calibration.

:func:`augment_organ_volume` draws, for one downsampled CT (the model grid, intensities in [0, 1]) and its organ map
(the localiser's class index + 1 per voxel, 0 elsewhere):

* **spatial**: one resampling through a random affine (per-axis scale, in-plane rotation about the craniocaudal axis,
  in millimetres so anisotropic grids rotate correctly) plus a smooth random displacement field (a coarse grid of
  displacements, trilinearly upsampled): organs stop being the ellipsoids of the phantoms and real organs take other
  patients' shapes. Image trilinear, organ map nearest (outside the scan in-plane: air; beyond its first or last
  slice: that slice repeated); the organ boxes are recomputed from the warped map
  (:func:`boxes_from_organ_map`), so they are exact on the model grid.
* **field of view**: a random craniocaudal crop (organs cut by it become truncated boxes, as in a real slab).
* **intensity**: gamma, contrast and brightness (about +-80 HU), Gaussian blur (a softer kernel, thicker slices) and
  Gaussian noise (a sharper kernel, a lower dose), then clamped to the window [0, 1].

Cases without a label map get the field-of-view crop (boxes clipped) and the intensity changes only: a box cannot
follow a non-rigid warp without the voxels it came from. All draws come from the ``torch.Generator`` passed in (the
trainer seeds it per epoch), so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..schema import check, option
from .data import label_extents

__all__ = ["OrganAugmentConfig", "augment_organ_volume", "boxes_from_organ_map"]


@dataclass
class OrganAugmentConfig:
    p: float = option(0.0, doc="probability that a training CT is augmented (0: never)", ge=0, le=1)
    scale: list[float] = option([0.85, 1.15], doc="per-axis scale range of the random affine", gt=0)
    rotate_deg: float = option(10.0, doc="largest in-plane rotation (degrees) about the craniocaudal axis", ge=0,
                               le=45)
    elastic_mm: float = option(12.0, doc="largest displacement (mm) of the smooth random field (0: none)", ge=0)
    elastic_grid_mm: float = option(80.0, doc="spacing (mm) of the displacement field's control points", gt=0)
    z_crop_p: float = option(0.3, doc="probability of a random craniocaudal crop (a shorter field of view)",
                             ge=0, le=1)
    z_keep: list[float] = option([0.35, 0.9], doc="fraction of the slices a crop keeps, [lo, hi]", gt=0, le=1)
    gamma: list[float] = option([0.7, 1.4], doc="gamma range applied to the [0, 1] window", gt=0)
    contrast: float = option(0.1, doc="largest relative change of contrast (and of brightness, in window units / 2)",
                             ge=0, lt=1)
    blur: float = option(1.0, doc="largest Gaussian blur sigma (voxels of the model grid)", ge=0)
    noise: float = option(0.03, doc="largest Gaussian noise sigma (window units)", ge=0)

    def validate(self, prefix: str = "augment") -> None:
        check(self, prefix)
        for key in ("scale", "z_keep", "gamma"):
            v = getattr(self, key)
            if len(v) != 2 or v[0] > v[1]:
                raise ValueError(f"{prefix}.{key} must be [lo, hi] with lo <= hi, got {v}")


def _u(lo: float, hi: float, g: torch.Generator, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def boxes_from_organ_map(organ_map: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Organ map ``[Z, Y, X]`` (class + 1 per voxel, 0 background) -> (class indices present ``[K']``, voxel boxes
    ``[K', 6]`` half-open, array order), by the label-map extents of :func:`medetect.organs.data.label_extents`."""
    m = organ_map.numpy() if isinstance(organ_map, torch.Tensor) else np.asarray(organ_map)
    counts = np.bincount(m.reshape(-1).astype(np.int64), minlength=num_classes + 1)
    ids = np.flatnonzero(counts[1:]) + 1
    vox = label_extents(m, ids, len(counts))
    return torch.from_numpy(ids - 1).long(), torch.from_numpy(vox).float()


def _sampling_grid(shape: Sequence[int], spacing: Sequence[float], cfg: OrganAugmentConfig,
                   g: torch.Generator) -> torch.Tensor:
    """grid_sample grid ``[1, Z, Y, X, 3]`` (x, y, z normalised, align_corners=False) of a random affine about the
    volume centre plus a smooth displacement field, all in millimetres."""
    sp = torch.tensor([float(s) for s in spacing], dtype=torch.float64)
    size = torch.tensor([float(s) for s in shape], dtype=torch.float64)
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5 - n / 2) * s for n, s in zip(shape, sp)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    pts = torch.stack([zz, yy, xx], -1)  # output voxel centres, mm from the centre, (z, y, x)
    s = _u(cfg.scale[0], cfg.scale[1], g, 3)
    t = math.radians(cfg.rotate_deg) * (2 * float(torch.rand(1, generator=g, dtype=torch.float64)) - 1)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)], [0.0, math.sin(t), math.cos(t)]],
                       dtype=torch.float64)
    src = pts @ (rot / s[None, :]).T  # output -> input: rotate, then undo the scale
    if cfg.elastic_mm > 0:
        n_ctrl = [max(2, int(math.ceil(float(e) / cfg.elastic_grid_mm)) + 1) for e in size * sp]
        ctrl = (2 * torch.rand(1, 3, *n_ctrl, generator=g, dtype=torch.float64) - 1) * cfg.elastic_mm
        disp = F.interpolate(ctrl, size=tuple(shape), mode="trilinear", align_corners=True)[0]  # [3, Z, Y, X]
        src = src + disp.permute(1, 2, 3, 0)
    idx = src / sp + size / 2  # input edge coordinate (voxel units)
    # craniocaudally the field of view just ends: a sample beyond the first / last slice repeats it (a thin slab
    # would otherwise slide out of itself); in-plane, outside the scan is air (zeros)
    idx[..., 0] = idx[..., 0].clamp(0.5, float(size[0]) - 0.5)
    norm = idx / size * 2 - 1  # align_corners=False normalisation
    return norm.flip(-1)[None].float()  # grid_sample wants (x, y, z)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[1, Z, Y, X]`` (sigma in voxels)."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    out = x[None]
    for a in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + a] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - a)] = pad[2 * (2 - a) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out[0]


def augment_organ_volume(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                         organ_map: torch.Tensor | None, spacing: Sequence[float], num_classes: int,
                         cfg: OrganAugmentConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """One random augmentation of a model-grid CT ``image [1, Z, Y, X]`` (window units) with its organ ``boxes
    [K, 6]`` / ``labels [K]`` and, when known, its ``organ_map [Z, Y, X]``. Returns (image, boxes, labels)."""
    x = image.float()
    if organ_map is not None:  # spatial: one resampling of image and organ map through the same random warp
        grid = _sampling_grid(x.shape[1:], spacing, cfg, g)
        x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        organ_map = F.grid_sample(organ_map[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False)[0, 0].to(torch.uint8)
    if float(torch.rand(1, generator=g)) < cfg.z_crop_p and x.shape[1] > 4:
        z = x.shape[1]
        keep = max(4, int(round(z * float(_u(cfg.z_keep[0], cfg.z_keep[1], g)))))
        z0 = int(torch.randint(0, z - keep + 1, (1,), generator=g))
        x = x[:, z0:z0 + keep]
        if organ_map is not None:
            organ_map = organ_map[z0:z0 + keep]
        else:  # boxes clipped to the kept slices; an organ left outside them is gone
            b = boxes.clone()
            b[:, [0, 3]] = (b[:, [0, 3]] - z0).clamp(0, keep)
            inside = b[:, 3] - b[:, 0] >= 1
            boxes, labels = b[inside], labels[inside]
    if organ_map is not None:
        labels, boxes = boxes_from_organ_map(organ_map, num_classes)
    # intensity: gamma, contrast / brightness, blur, noise, in window units
    x = x.clamp(0, 1) ** float(_u(cfg.gamma[0], cfg.gamma[1], g))
    c = float(_u(1 - cfg.contrast, 1 + cfg.contrast, g))
    b = float(_u(-cfg.contrast / 2, cfg.contrast / 2, g))
    x = x * c + b
    sigma = float(_u(0, cfg.blur, g))
    if sigma > 0.3:
        x = _blur(x, sigma)
    x = x + torch.randn(x.shape, generator=g) * float(_u(0, cfg.noise, g))
    return x.clamp(0, 1).contiguous(), boxes, labels
