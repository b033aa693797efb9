"""One-object windows for classification + localisation: the training and validation data of the lineage's first
step (and of OverFeat, which is the same network).

:func:`object_crops` cuts, from every image of a :class:`~medetect.lineage.data.LineageSet`:

* one window per object: a square (cube) of side ``s = L * c`` around it, ``L`` the object's longest box side and
  ``c`` drawn uniformly in ``context`` (how much surroundings the network sees), its centre the box centre moved by
  ``jitter * s * u`` per axis, ``u`` uniform in [-1, 1] (the object is not always in the middle). The object's box,
  in the window's pixels after resizing to ``window`` (``(box - corner) * window / s``), is the target; it is not
  clipped (with a large jitter an object may stick out of its window; the box still says where it is);
* ``negatives_per_image`` background windows: sides drawn log-uniformly between the smallest and the largest
  object-window side of the whole set (``min L * context[0]`` .. ``max L * context[1]``), centres uniform in the image;
  a candidate is kept when its IoU with every object box is below ``NEG_IOU`` (0.3) and it contains no object centre
  (so it is not a well-framed object at another scale). ``NEG_CANDIDATES`` x as many candidates as needed are drawn
  per image and the first that pass are taken; a shortfall is counted and reported with one warning.

Windows are cut with zero padding outside the image (raw value 0) and resized to ``window`` by RoIAlign with
adaptive sampling (every bin averages ``ceil(s / window)`` samples per axis, i.e. an area-like downsampling),
all windows of an image in one call. Crops keep the raw values (normalise them with
:func:`medetect.lineage.data.normalise`). Everything is drawn from one ``torch.Generator`` seeded with ``seed``, in
a fixed order and count per image: the same call gives the same crops. Written for any d.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..boxes import box_iou
from ..layers.roi_align import roi_align
from .data import LineageSet

__all__ = ["object_crops", "crop_windows", "NEG_IOU", "NEG_CANDIDATES"]

NEG_IOU = 0.3  # a background window overlaps every object box less than this (R-CNN's negative threshold)
NEG_CANDIDATES = 20  # candidates drawn per wanted background window


def crop_windows(image: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Windows ``[N, 2d]`` (pixels, may reach outside) of one raw image ``[C, *S]`` -> ``[N, C, *(size,) * d]``,
    zero outside the image, resized by RoIAlign (adaptive sampling)."""
    d = image.dim() - 1
    if len(windows) == 0:
        return image.new_zeros((0, image.shape[0]) + (size,) * d)
    spatial = torch.tensor(image.shape[1:], dtype=windows.dtype, device=windows.device)
    outside = torch.cat([-windows[:, :d], windows[:, d:] - spatial]).max()
    m = int(math.ceil(float(outside.clamp(min=0)))) + 2  # zero margin so that interpolation sees zeros outside
    padded = F.pad(image, (m, m) * d)
    rois = torch.cat([windows.new_zeros(len(windows), 1), windows + m], 1)  # [N, 1 + 2d] (batch index, box)
    return roi_align(padded[None].float(), rois.float(), size, spatial_scale=1.0, sampling_ratio=0, aligned=True)


def _contains(windows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[N, M]``: window n contains point m (half-open)."""
    d = points.shape[1]
    p = points[None]  # [1, M, d]
    return ((p >= windows[:, None, :d]) & (p < windows[:, None, d:])).all(-1)


def object_crops(data: LineageSet, *, window: int, context: tuple[float, float] = (1.3, 2.0), jitter: float = 0.15,
                 negatives_per_image: int = 4, seed: int = 0, return_windows: bool = False):
    """Object and background windows of every image (module docstring) -> ``(crops [N, C, *(window,) * d]`` raw
    values, ``targets``: one ``{"boxes": [1 or 0, 2d] (window pixels), "labels": [1 or 0]}`` per crop, objects of an
    image first, then its background windows, images in order)``. With ``return_windows`` a third item: ``[N, 1 +
    2d]`` rows (image index, window box in image pixels)."""
    c0, c1 = float(context[0]), float(context[1])
    if not 0 < c0 <= c1:
        raise ValueError(f"context must be (low, high) with 0 < low <= high, got {tuple(context)}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if window < 1 or negatives_per_image < 0:
        raise ValueError(f"window must be >= 1 and negatives_per_image >= 0, got {window} and {negatives_per_image}")
    g = torch.Generator().manual_seed(int(seed))
    longest = torch.cat([(b[:, b.shape[1] // 2:] - b[:, : b.shape[1] // 2]).amax(1) for b in data.boxes]
                        + [torch.zeros(0)])
    if len(longest):
        side_lo, side_hi = max(1.0, float(longest.min()) * c0), max(2.0, float(longest.max()) * c1)
    else:
        side_lo, side_hi = window / 2, 2.0 * window
    crops, targets, wins, short = [], [], [], 0
    for image, boxes, labels in zip(data.images, data.boxes, data.labels):  # one call of RoIAlign per image
        d = image.dim() - 1
        spatial = torch.tensor(image.shape[1:], dtype=torch.float32)
        boxes = boxes.float().reshape(-1, 2 * d)
        n = len(boxes)
        lo, hi = boxes[:, :d], boxes[:, d:]
        side = (hi - lo).amax(1) * (c0 + (c1 - c0) * torch.rand(n, generator=g))  # [G]
        centre = (lo + hi) / 2 + jitter * side[:, None] * (2 * torch.rand(n, d, generator=g) - 1)  # [G, d]
        corner = centre - side[:, None] / 2
        obj_win = torch.cat([corner, corner + side[:, None]], 1)  # [G, 2d]
        # background candidates
        n_cand = NEG_CANDIDATES * negatives_per_image
        nside = torch.exp(math.log(side_lo) + (math.log(side_hi) - math.log(side_lo)) * torch.rand(n_cand, generator=g))
        ncentre = torch.rand(n_cand, d, generator=g) * spatial
        ncorner = ncentre - nside[:, None] / 2
        cand = torch.cat([ncorner, ncorner + nside[:, None]], 1)  # [n_cand, 2d]
        if n:
            ok = (box_iou(cand, boxes) < NEG_IOU).all(1) & ~_contains(cand, (lo + hi) / 2).any(1)
        else:
            ok = torch.ones(n_cand, dtype=torch.bool)
        neg_win = cand[ok.nonzero().flatten()[:negatives_per_image]]
        short += negatives_per_image - len(neg_win)
        both = torch.cat([obj_win, neg_win])
        crops.append(crop_windows(image, both, window))
        wins.append(torch.cat([torch.full((len(both), 1), float(len(wins))), both], 1))
        tb = (boxes - obj_win[:, :d].repeat(1, 2)) * (window / side[:, None])  # [G, 2d] window pixels
        targets += [{"boxes": tb[j: j + 1], "labels": labels[j: j + 1].long()} for j in range(n)]
        targets += [{"boxes": torch.zeros(0, 2 * d), "labels": torch.zeros(0, dtype=torch.long)}] * len(neg_win)
    if short:
        warnings.warn(f"object_crops: {short} of {negatives_per_image * len(data)} background windows could not be "
                      f"placed (no candidate had IoU < {NEG_IOU} with every object and no object centre inside)",
                      RuntimeWarning, stacklevel=2)
    c = data.images[0].shape[0] if len(data) else 1
    d = data.images[0].dim() - 1 if len(data) else 2
    out = torch.cat(crops) if crops else torch.zeros((0, c) + (window,) * d)
    if return_windows:
        return out, targets, torch.cat(wins) if wins else torch.zeros(0, 1 + 2 * d)
    return out, targets
