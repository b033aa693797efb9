"""Inference: whole images, and tiled sliding-window inference with overlap and merging for images or volumes too
large for one forward pass.

Tiles of ``tile_size`` are laid on a regular grid with ``overlap`` (a fraction of the tile) and the last tile flush
with the far border, so every voxel is seen; the tiles' detections are shifted back to image coordinates, boxes that
touch an inner tile border (cut objects, seen whole by a neighbouring tile) are down-weighted, the union is merged
by per-class NMS, and a cut box lying mostly (intersection over its own volume > ``cut_containment``) inside an uncut
box of the same class is dropped: NMS alone keeps such slivers, whose IoU with the whole object is small. Tiles are batched through the model ``batch_size`` at a time.

Caps: ``max_detections`` (default: the model's ``detections_per_img``) bounds the detections of a whole image AND of a
tiled one (the model's own per-forward cap is raised to it while predicting, so asking for more than 100 gives more
than 100); a ``UserWarning`` says when the cap was reached. Inputs smaller than ``min_size`` voxels on a side are
zero-padded at the high end (a stride-32 backbone needs more than one voxel per GroupNorm group at its last stage);
detections centred in the padding are dropped (``drop_padded``; the first release kept them, clipped to the image
border, which gave a 1-voxel volume dozens of marks) and boxes are clipped back to the real image.

:meth:`Predictor.predict_image` is the one application path: an image (a :class:`medetect.data.image.MedicalImage`,
a numpy array or a file, see :func:`as_medical_image`) and the model's stored :class:`medetect.models.io.Preprocess`
-> detections in voxels of the INPUT grid and in world mm.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..boxes import _intersection, batched_nms, box_area, clip_boxes, fuse_views

if TYPE_CHECKING:
    from ..data.image import MedicalImage
    from ..models.io import Preprocess


def _pairwise_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, 2d] x [M, 2d] -> [N, M]`` intersection volumes."""
    return _intersection(a[:, None, :], b[None, :, :], a.shape[1] // 2)

__all__ = ["Predictor", "as_medical_image", "tile_origins"]


def as_medical_image(image, preprocess: Preprocess, *, spacing: Sequence[float] | None = None,
                     origin: Sequence[float] | None = None) -> MedicalImage:
    """What :meth:`Predictor.predict_image` takes -> a :class:`~medetect.data.image.MedicalImage`.

    * a ``MedicalImage``: as is;
    * a path (``str`` / ``os.PathLike``): :func:`medetect.data.io.read_image` (any supported file or DICOM folder);
    * a numpy array, read the way the model's ``preprocess`` says: for a 2D model ``H x W`` (grey) or
      ``H x W x C`` with C = 1, 3 or 4 (channels last, as ``np.asarray(PIL.Image.open(...))`` gives; a 4th, alpha,
      channel is dropped as the image readers drop it, unless the model takes 4 channels); for a 3D model a volume
      ``Z x Y x X``. The array becomes channels first ``[C, *spatial]`` (a view, values and dtype unchanged) with
      ``spacing`` (mm per array axis, default 1) and ``origin`` (world ``x, y[, z]`` mm of voxel 0's centre,
      default 0) and the identity direction.

    ``spacing`` and ``origin`` go with arrays only: a MedicalImage or a file carries its own geometry."""
    from ..convert import Geometry
    from ..data.image import MedicalImage

    if isinstance(image, MedicalImage) or isinstance(image, (str, os.PathLike)):
        if spacing is not None or origin is not None:
            raise ValueError("spacing and origin go with a numpy array; a MedicalImage or a file carries its own "
                             "geometry")
        if isinstance(image, MedicalImage):
            return image
        from ..data.io import read_image

        return read_image(image)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a MedicalImage, a numpy array or a path, got {type(image).__name__}")
    d, shape = preprocess.ndim, tuple(image.shape)
    meta: dict = {"format": "array"}
    if image.ndim == d:
        array = image[None]
    elif d == 2 and image.ndim == 3 and shape[2] in (1, 3, 4):
        array = np.moveaxis(image, -1, 0)
        if shape[2] == 4 and preprocess.channels != 4:
            array, meta["alpha_dropped"] = array[:3], True
    else:
        want = ("H x W (grey) or H x W x C with C = 1, 3 or 4 (channels last)" if d == 2 else
                "Z x Y x X" if d == 3 else f"{d} axes")
        raise ValueError(f"image: the model takes {d}D inputs, as a numpy array of shape {want}; got shape {shape}")
    if array.shape[0] in (1, 3):
        meta["photometric"] = "MONOCHROME2" if array.shape[0] == 1 else "RGB"
    for name, value in (("spacing", spacing), ("origin", origin)):
        if value is not None and len(value) != d:
            raise ValueError(f"{name} must have {d} entries for a {d}D image, got {tuple(value)}")
    geometry = Geometry.identity(d, spacing)
    if origin is not None:
        geometry = Geometry(geometry.spacing, tuple(origin), geometry.direction)
    return MedicalImage(array, geometry, meta)


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
        max_detections: int | None = None,
        score_thresh: float | None = None,
        min_size: int = 64,
        drop_padded: bool = True,
        tta: str | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        if tile_size is not None and (isinstance(tile_size, (int, float)) or not all(int(t) == t and t > 0 for t in tile_size)):
            raise ValueError(f"--tile must be positive integers (one per axis), got {tile_size!r}")
        self.tile_size = None if tile_size is None else tuple(int(t) for t in tile_size)
        if max_detections is not None and (int(max_detections) != max_detections or max_detections < 1):
            raise ValueError(f"max_detections must be a positive integer, got {max_detections!r}")
        self.max_detections = None if max_detections is None else int(max_detections)
        self.score_thresh, self.min_size, self.drop_padded = score_thresh, int(min_size), bool(drop_padded)
        self.overlap, self.batch_size, self.nms_thresh = overlap, batch_size, nms_thresh
        self.border_penalty, self.size_divisor = border_penalty, size_divisor
        self.cut_containment = cut_containment
        self.autocast = self.device.type == "cuda" if autocast is None else autocast
        self.tta = getattr(getattr(model, "config", None), "tta", "none") if tta is None else tta
        if self.tta not in ("none", "flips"):
            raise ValueError(f"tta must be 'none' or 'flips', got {self.tta!r}")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the spatial dims of ``[B, C, *S]`` at the high end up to a multiple of ``size_divisor``."""
        target = [max(math.ceil(s / self.size_divisor) * self.size_divisor, self.min_size) for s in x.shape[2:]]
        if list(x.shape[2:]) == target:
            return x
        out = x.new_zeros((*x.shape[:2], *target))
        out[(slice(None), slice(None), *[slice(0, s) for s in x.shape[2:]])] = x
        return out

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image of ``batch``; with ``tta="flips"`` each view (the batch flipped along a subset of
        its axes, 2^d views) runs in turn, its boxes are flipped back and the views fused per image
        (:func:`~medetect.boxes.fuse_views` at the model's NMS threshold), at most the cap per image."""
        if self.tta == "none":
            return self._forward_once(batch)
        d = batch.ndim - 2
        combos = [axes for r in range(d + 1) for axes in itertools.combinations(range(d), r)]
        size = torch.tensor(batch.shape[2:], dtype=torch.float32, device=self.device)
        per_image: list[list[dict]] = [[] for _ in range(batch.shape[0])]
        for v, axes in enumerate(combos):  # loop over the 2^d views
            dets = self._forward_once(batch.flip([2 + a for a in axes]) if axes else batch)
            for i, det in enumerate(dets):  # loop over the images of a batch
                b = det["boxes"].float()
                if axes:
                    ax = torch.zeros(d, dtype=torch.bool, device=b.device)
                    ax[list(axes)] = True
                    lo, hi = b[:, :d], b[:, d:]
                    b = torch.cat([torch.where(ax, size - hi, lo), torch.where(ax, size - lo, hi)], dim=1)
                per_image[i].append({**det, "boxes": b, "view": torch.full_like(det["labels"], v)})
        cfg = getattr(self.model, "config", None)
        iou = float(getattr(cfg, "nms_thresh", self.nms_thresh))
        cap = self._cap()
        out = []
        for views in per_image:  # loop over the images of a batch, not over boxes
            cat = {k: torch.cat([x[k] for x in views]) for k in ("boxes", "scores", "labels", "view")}
            boxes, scores, labels = fuse_views(cat["boxes"], cat["scores"], cat["labels"], cat["view"], len(combos), iou)
            out.append({"boxes": boxes[:cap], "scores": scores[:cap], "labels": labels[:cap]})
        return out

    @torch.no_grad()
    def _forward_once(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            dets = self.model(self._pad(batch.to(self.device)))["detections"]
        if not self.drop_padded:
            return dets
        # a detection centred in the zero padding is not in the image (a 1-voxel input is all padding)
        d = batch.ndim - 2
        size = torch.tensor(batch.shape[2:], dtype=torch.float32, device=self.device)
        out = []
        for det in dets:  # loop over the images of a batch, not over boxes
            b = det["boxes"].float()
            inside = (((b[:, :d] + b[:, d:]) / 2) < size).all(-1)
            out.append({k: v[inside] for k, v in det.items()})
        return out

    def _cap(self) -> int:
        cfg = getattr(self.model, "config", None)
        return self.max_detections or int(getattr(cfg, "detections_per_img", 100))

    @contextlib.contextmanager
    def _head_settings(self, cap: int):
        """Temporarily give the model's detection head the predictor's cap and score threshold."""
        head = getattr(self.model, "heads", None)
        saved = {k: getattr(head, k) for k in ("detections_per_img", "score_thresh") if hasattr(head, k)}
        try:
            if "detections_per_img" in saved:
                head.detections_per_img = cap
            if self.score_thresh is not None and "score_thresh" in saved:
                head.score_thresh = self.score_thresh
            yield
        finally:
            for k, v in saved.items():
                setattr(head, k, v)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections ``{"boxes", "scores", "labels"}`` for one image ``[C, *S]`` (on the CPU), at most
        ``max_detections`` (warns when the cap is reached)."""
        cap = self._cap()
        with self._head_settings(cap):
            det, hit = self._predict(image, cap)
        if hit:
            warnings.warn(f"{len(det['scores'])} detections: the cap max_detections={cap} was reached, raise it "
                          "(--max-detections) to see more", stacklevel=2)
        return det

    def _predict(self, image: torch.Tensor, cap: int) -> tuple[dict[str, torch.Tensor], bool]:
        d = image.ndim - 1
        shape = tuple(image.shape[1:])
        if self.tile_size is not None and len(self.tile_size) != d:
            raise ValueError(f"tile_size must have {d} entries for a {d}D image, got {self.tile_size}")
        if self.tile_size is None or all(s <= t for s, t in zip(shape, self.tile_size)):
            det = self._forward(image[None])[0]
            det = {k: v.float() if k != "labels" else v for k, v in det.items()}
            det["boxes"] = clip_boxes(det["boxes"], shape)
            return {k: v.cpu() for k, v in det.items()}, len(det["scores"]) >= cap
        tile = tuple(min(t, s) for t, s in zip(self.tile_size, shape))
        origins = tile_origins(shape, tile, self.overlap)
        boxes, scores, labels, cuts = [], [], [], []
        hit = False
        for start in range(0, len(origins), self.batch_size):  # loop over tile batches
            chunk = origins[start : start + self.batch_size]
            crops = torch.stack([image[(slice(None), *[slice(o, o + t) for o, t in zip(org, tile)])] for org in chunk])
            for org, det in zip(chunk, self._forward(crops)):
                hit |= len(det["scores"]) >= cap  # a tile at its cap may hide detections
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
        hit |= len(keep) > cap
        keep = keep[:cap]
        return {"boxes": clip_boxes(b[keep], shape).cpu(), "scores": s[keep].cpu(), "labels": lab[keep].cpu()}, hit

    def predict_many(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.predict(im) for im in images]

    def predict_image(self, image, preprocess: Preprocess, *, allow_range_mismatch: bool = False,
                      spacing: Sequence[float] | None = None,
                      origin: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        """An image (a :class:`MedicalImage`, a numpy array with optional ``spacing`` and ``origin``, or a path; see
        :func:`as_medical_image`) through the model's stored ``preprocess`` (:func:`medetect.data.preprocess.prepare`)
        -> ``{"boxes" [N, 2d] float64 in voxels of the INPUT grid, "scores", "labels", "centres_world" [N, d]
        (x, y[, z] mm), "extent_mm" [N, d] (array order), "diameters_mm" [N]}``, sorted by score (descending).
        With ``preprocess.pyramid`` the model also runs on each coarser level; the levels' detections, on the input
        grid, are merged by per-class NMS (``nms_thresh``) and cut to the cap; a coarser level keeps only detections
        of at least ``preprocess.pyramid_min_size`` voxels (its own grid) on their longest side."""
        import dataclasses

        from ..convert import boxes_to_luna
        from ..data.preprocess import prepare

        image = as_medical_image(image, preprocess, spacing=spacing, origin=origin)
        prep = prepare(image, preprocess, allow_range_mismatch=allow_range_mismatch)
        det = self.predict(prep.tensor)
        boxes = prep.to_input(det["boxes"])
        scores, labels = det["scores"], det["labels"]
        if preprocess.pyramid:
            parts = [(boxes, scores, labels)]
            for f in preprocess.pyramid:
                level = dataclasses.replace(preprocess, scale=preprocess.scale * f, pyramid=None)
                p = prepare(image, level, allow_range_mismatch=allow_range_mismatch)
                dl = self.predict(p.tensor)
                d = dl["boxes"].shape[1] // 2
                big = (dl["boxes"][:, d:] - dl["boxes"][:, :d]).amax(1) >= preprocess.pyramid_min_size
                parts.append((p.to_input(dl["boxes"][big]), dl["scores"][big], dl["labels"][big]))
            boxes = torch.cat([b for b, _, _ in parts])
            scores = torch.cat([s for _, s, _ in parts])
            labels = torch.cat([lab for _, _, lab in parts])
            keep = batched_nms(boxes.float(), scores, labels, self.nms_thresh)[: self._cap()]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = torch.argsort(scores, descending=True, stable=True)
        boxes = boxes[order]
        centres, dia = boxes_to_luna(boxes, prep.geometry)
        d = boxes.shape[1] // 2
        extent = (boxes[:, d:] - boxes[:, :d]) * torch.tensor(prep.geometry.spacing, dtype=torch.float64)
        return {"boxes": boxes, "scores": scores[order], "labels": labels[order],
                "centres_world": centres.reshape(-1, d), "extent_mm": extent, "diameters_mm": dia.reshape(-1)}
