"""Inference: whole images, and tiled sliding-window inference with overlap and merging for images or volumes too
large for one forward pass.

Tiles of ``tile_size`` are laid on a regular grid with ``overlap`` (a fraction of the tile) and the last tile flush
with the far border, so every voxel is seen; the tiles' detections are shifted back to image coordinates, boxes that
touch an inner tile border (cut objects, seen whole by a neighbouring tile) are down-weighted, the union is merged
by per-class NMS, and a cut box lying mostly (intersection over its own volume > ``cut_containment``) inside an uncut
box of the same class is dropped: NMS alone keeps such slivers, whose IoU with the whole object is small. Tiles are batched through the model ``batch_size`` at a time.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from ..boxes import _intersection, batched_nms, box_area, clip_boxes


def _pairwise_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, 2d] x [M, 2d] -> [N, M]`` intersection volumes."""
    return _intersection(a[:, None, :], b[None, :, :], a.shape[1] // 2)

__all__ = ["Predictor", "tile_origins"]


def tile_origins(size: Sequence[int], tile: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Tile corners covering ``size`` with tiles of ``tile`` overlapping by ``overlap`` (fraction, in [0, 1))."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    per_axis = []
    for s, t in zip(size, tile):
        if s <= t:
            per_axis.append([0])
            continue
        step = max(1, int(t * (1 - overlap)))
        n = math.ceil((s - t) / step) + 1
        per_axis.append(sorted({min(i * step, s - t) for i in range(n)}))
    return list(itertools.product(*per_axis))


class Predictor:
    """Wraps a trained detector for inference on ``[C, *S]`` images (any d)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device | None = None,
        tile_size: Sequence[int] | None = None,
        overlap: float = 0.25,
        batch_size: int = 4,
        nms_thresh: float = 0.5,
        border_penalty: float = 0.5,
        cut_containment: float = 0.6,
        size_divisor: int = 32,
        autocast: bool | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tile_size = None if tile_size is None else tuple(int(t) for t in tile_size)
        self.overlap, self.batch_size, self.nms_thresh = overlap, batch_size, nms_thresh
        self.border_penalty, self.size_divisor = border_penalty, size_divisor
        self.cut_containment = cut_containment
        self.autocast = self.device.type == "cuda" if autocast is None else autocast

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the spatial dims of ``[B, C, *S]`` at the high end up to a multiple of ``size_divisor``."""
        target = [math.ceil(s / self.size_divisor) * self.size_divisor for s in x.shape[2:]]
        if list(x.shape[2:]) == target:
            return x
        out = x.new_zeros((*x.shape[:2], *target))
        out[(slice(None), slice(None), *[slice(0, s) for s in x.shape[2:]])] = x
        return out

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(self._pad(batch.to(self.device)))["detections"]

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections ``{"boxes", "scores", "labels"}`` for one image ``[C, *S]`` (on the CPU)."""
        d = image.ndim - 1
        shape = tuple(image.shape[1:])
        if self.tile_size is not None and len(self.tile_size) != d:
            raise ValueError(f"tile_size must have {d} entries for a {d}D image, got {self.tile_size}")
        if self.tile_size is None or all(s <= t for s, t in zip(shape, self.tile_size)):
            det = self._forward(image[None])[0]
            det = {k: v.float() if k != "labels" else v for k, v in det.items()}
            det["boxes"] = clip_boxes(det["boxes"], shape)
            return {k: v.cpu() for k, v in det.items()}
        tile = tuple(min(t, s) for t, s in zip(self.tile_size, shape))
        origins = tile_origins(shape, tile, self.overlap)
        boxes, scores, labels, cuts = [], [], [], []
        for start in range(0, len(origins), self.batch_size):  # loop over tile batches
            chunk = origins[start : start + self.batch_size]
            crops = torch.stack([image[(slice(None), *[slice(o, o + t) for o, t in zip(org, tile)])] for org in chunk])
            for org, det in zip(chunk, self._forward(crops)):
                off = torch.tensor(org * 2, dtype=torch.float32, device=det["boxes"].device)
                b = det["boxes"].float()
                lo_t = torch.tensor(org, dtype=torch.float32, device=b.device)
                hi_t = lo_t + torch.tensor(tile, dtype=torch.float32, device=b.device)
                size_t = torch.tensor(shape, dtype=torch.float32, device=b.device)
                # A box touching a tile border that is not the image border was probably cut by the tile.
                cut_lo = (b[:, :d] <= 0.5) & (lo_t > 0)
                cut_hi = (b[:, d:] >= hi_t - lo_t - 0.5) & (hi_t < size_t)
                cut = (cut_lo | cut_hi).any(-1)
                s = det["scores"].float() * torch.where(cut, self.border_penalty, 1.0)
                boxes.append(b + off)
                scores.append(s)
                labels.append(det["labels"])
                cuts.append(cut)
        b, s, lab, cut = torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(cuts)
        keep = batched_nms(b, s, lab, self.nms_thresh)
        b, s, lab, cut = b[keep], s[keep], lab[keep], cut[keep]
        # Drop cut slivers contained in an uncut detection of the same class ([K, K] pairwise, no loop over boxes).
        inter = _pairwise_intersection(b, b)
        own = box_area(b).clamp(min=1e-6)
        contained = (inter / own[:, None] > self.cut_containment) & (lab[:, None] == lab[None, :]) & ~cut[None, :]
        contained.fill_diagonal_(False)
        keep = (~(cut & contained.any(1))).nonzero().squeeze(1)
        cfg = getattr(self.model, "config", None)
        keep = keep[: getattr(cfg, "detections_per_img", len(keep)) * max(1, len(origins))]
        return {"boxes": clip_boxes(b[keep], shape).cpu(), "scores": s[keep].cpu(), "labels": lab[keep].cpu()}

    def predict_many(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.predict(im) for im in images]
