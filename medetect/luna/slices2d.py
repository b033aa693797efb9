"""The lecture's 2D variant of LUNA16 detection: a 2D Faster R-CNN on axial slices, slice boxes linked into 3D.

1. Training targets (:func:`slice_boxes`): each nodule's 3D box (``convert.luna_to_boxes``: the cube circumscribing
   the sphere) cut at every axial slice whose centre it spans gives that slice's 2D box ``(y0, x0, y1, x1)``
   (``shape="sphere"`` instead uses the sphere's circular cross-section at the slice, a tighter box).
2. The detector (:func:`default_slice_config`): :func:`medetect.models.detector.build_detector` with ``ndim=2`` and
   ``in_channels = 2 * context + 1`` adjacent slices (lung window, ``[0, 1]``) as channels, small enough for a CPU.
3. Inference (:func:`detect_slices`): proposals/detections on every axial slice (batches of slices).
4. Linking (:func:`link_slice_boxes`): boxes on consecutive slices with IoU (or intersection over the smaller box)
   > ``iou_thresh`` are linked (one vectorised overlap matrix per slice pair), connected components of the link graph (vectorised min-label propagation) are the 3D
   candidates; each gets the bounding box of its members, a world centre (``convert.voxel_to_world``), a score (max
   of its members) and the number of slices it spans.
5. Stage two: the candidates' world centres are rescored by :mod:`medetect.luna.fpr` (``score_candidates`` and
   ``fuse``) exactly like the 3D detector's.

Slices are used at the scan's native in-plane resolution (fine for phantoms; real LUNA16 512 x 512 slices are
larger and slower but work the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..boxes import _intersection, box_area, box_iou
from ..convert import Geometry, luna_to_boxes, voxel_to_world, world_to_voxel
from ..models.detector import DetectorConfig, build_detector

__all__ = [
    "slice_boxes",
    "slice_stack",
    "SliceDataset",
    "default_slice_config",
    "train_slices2d",
    "detect_slices",
    "link_slice_boxes",
    "detect_scan_2d",
    "save_slice_model",
    "load_slice_model",
]


def slice_boxes(centres_world, diameters, geometry: Geometry, n_slices: int, *, shape: str = "box") -> list[np.ndarray]:
    """Per axial slice ``z`` (array axis 0), the 2D boxes ``[k, 4]`` (``y0, x0, y1, x1`` voxel edges) of the nodules
    (world centres ``[G, 3]`` mm and diameters ``[G]``) that span it. Vectorised over (slice, nodule) pairs."""
    c = np.asarray(centres_world, dtype=np.float64).reshape(-1, 3)
    dia = np.asarray(diameters, dtype=np.float64).reshape(-1)
    if len(c) == 0:
        return [np.zeros((0, 4)) for _ in range(n_slices)]
    b3 = np.asarray(luna_to_boxes(c, dia, geometry))  # [G, 6] (z0, y0, x0, z1, y1, x1)
    ctr = np.asarray(world_to_voxel(c, geometry))  # [G, 3]
    sp = np.asarray(geometry.spacing)
    zc = np.arange(n_slices)[:, None] + 0.5  # [Z, 1] slice centres
    inside = (zc > b3[None, :, 0]) & (zc < b3[None, :, 3])  # [Z, G]
    half = np.broadcast_to(dia[None] / 2, inside.shape).copy()  # mm, in-plane half width
    if shape == "sphere":
        dz = (zc - ctr[None, :, 0]) * sp[0]
        half = np.sqrt(np.clip((dia[None] / 2) ** 2 - dz**2, 0, None))
        inside &= half > 0
    elif shape != "box":
        raise ValueError(f"shape must be 'box' or 'sphere', got {shape!r}")
    lo = ctr[None, :, 1:] - half[..., None] / sp[1:]  # [Z, G, 2]
    hi = ctr[None, :, 1:] + half[..., None] / sp[1:]
    boxes = np.concatenate([lo, hi], axis=-1)  # [Z, G, 4]
    return [boxes[z][inside[z]] for z in range(n_slices)]


def slice_stack(volume: torch.Tensor, z: torch.Tensor, context: int, window=(-1000.0, 400.0)) -> torch.Tensor:
    """Slices ``z`` with ``context`` neighbours each side as channels: ``[len(z), 2 * context + 1, H, W]`` in [0, 1]."""
    offs = torch.arange(-context, context + 1)
    idx = (z[:, None] + offs[None]).clamp(0, volume.shape[0] - 1)
    x = volume[idx].to(torch.float32)
    return ((x - window[0]) / (window[1] - window[0])).clamp(0, 1)


def _nodules_by_uid(annotations) -> Mapping:
    """``{uid: (centres [G, 3], diameters [G])}`` from a :class:`~medetect.data.annotations.WorldPoints` or a mapping."""
    from ..data.annotations import WorldPoints

    return annotations.to_dict("diameters") if isinstance(annotations, WorldPoints) else annotations


class SliceDataset(Dataset):
    """Axial slices of training scans: every slice with a nodule plus ``neg_ratio`` times as many random slices
    without one. Samples ``{"image": [C, H, W], "boxes": [G, 4], "labels": [G]}`` (the Trainer's detection collate).

    ``annotations``: the nodules as a :class:`~medetect.data.annotations.WorldPoints` (``LunaLayout.nodule_points``)
    or ``{uid: (centres_xyz [G, 3], diameters [G])}`` (``LunaLayout.annotations``)."""

    def __init__(self, scans: Mapping, annotations: Mapping, *, context: int = 1, neg_ratio: float = 0.5,
                 box_shape: str = "sphere", seed: int = 0, flip: bool = True):
        from .fpr import _volume_tensor, load_scan

        annotations = _nodules_by_uid(annotations)
        self.context, self.flip = context, flip
        self.vols, self.boxes, items = [], [], []
        rng = np.random.default_rng(seed)
        for uid, src in scans.items():  # data loading: a loop over scans
            vol, geom = src if isinstance(src, tuple) else load_scan(src)
            vol = _volume_tensor(vol).to(torch.int16 if vol.dtype == np.int16 else torch.float32)
            c, dia = annotations.get(uid, (np.zeros((0, 3)), np.zeros(0)))
            per = slice_boxes(c, dia, geom, vol.shape[0], shape=box_shape)
            k = len(self.vols)
            self.vols.append(vol)
            self.boxes.append(per)
            pos = [z for z in range(vol.shape[0]) if len(per[z])]
            neg = [z for z in range(vol.shape[0]) if not len(per[z])]
            n_neg = min(len(neg), int(round(neg_ratio * max(1, len(pos)))))
            items += [(k, z) for z in pos] + [(k, int(z)) for z in rng.choice(neg, n_neg, replace=False)] if neg else []
            if not neg:
                items += [(k, z) for z in pos]
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        k, z = self.items[i]
        img = slice_stack(self.vols[k], torch.tensor([z]), self.context)[0]
        b = torch.as_tensor(self.boxes[k][z], dtype=torch.float32).reshape(-1, 4)
        if self.flip:  # random horizontal / vertical flips
            h, w = img.shape[1:]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
                b = torch.stack([b[:, 0], w - b[:, 3], b[:, 2], w - b[:, 1]], dim=1)
            if torch.rand(()) < 0.5:
                img = img.flip(-2)
                b = torch.stack([h - b[:, 2], b[:, 1], h - b[:, 0], b[:, 3]], dim=1)
        return {"image": img, "boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)}


def default_slice_config(context: int = 1) -> DetectorConfig:
    """A small 2D Faster R-CNN for nodule-sized boxes of 2..12 px (stride 2 and 4 pyramid levels), CPU-trainable."""
    return DetectorConfig(
        arch="faster_rcnn", ndim=2, in_channels=2 * context + 1, num_classes=1, class_names=["nodule"],
        backbone="resnet18", base_width=16, stem_stride=1, fpn_channels=32, levels=[2, 3],
        anchor_sizes=[[4.0, 8.0], [12.0, 20.0]], aspect_ratios=[1.0],
        rpn_pre_nms_top_n=[600, 300], rpn_post_nms_top_n=[200, 100], rpn_batch_size_per_image=128,
        roi_output_size=5, roi_hidden=128, roi_batch_size_per_image=64,
        score_thresh=0.05, nms_thresh=0.3, detections_per_img=20,
    )


def _slice_preprocess(cfg: DetectorConfig):
    """The slice model's input: CT slices (+ context slices as channels) in the lung window, no resampling."""
    from ..models.io import Preprocess

    return Preprocess(ndim=2, channels=cfg.in_channels, window=[-1000.0, 400.0])


def save_slice_model(model, path, *, context: int | None = None, extra: dict | None = None) -> Path:
    """The one model writer (:func:`medetect.models.io.save_model`, kind ``"detector"``): CT slices (plus ``context``
    slices each side as channels) in the lung window, no resampling; float32 tensors."""
    from ..models.io import save_model

    cfg = model.config
    return save_model(model, path, kind="detector", preprocess=_slice_preprocess(cfg), classes=list(cfg.class_names or ["nodule"]),
                      extra={"slices2d": {"context": context if context is not None else (cfg.in_channels - 1) // 2},
                             **(extra or {})}, fp16=False)


def load_slice_model(path, device=None):
    """Any slice-model file (current or first-release format) or a training run folder of
    :func:`train_slices2d` (its newest checkpoint) through the one loader."""
    from ..engine.load import load_model

    m = load_model(path, device=device or "cpu")
    if m.kind != "detector" or m.model.config.ndim != 2:
        raise ValueError(f"{path}: not a 2D slice detector")
    return m.model


def train_slices2d(scans: Mapping, annotations: Mapping, run_dir, *, config: DetectorConfig | None = None, train=None,
                   context: int = 1, neg_ratio: float = 0.5, resume: bool = True, progress: bool = True):
    """Train the slice detector with the medetect Trainer; writes ``run_dir/model.safetensors``.

    ``annotations``: the nodules, as :class:`SliceDataset` takes them (a ``WorldPoints`` or
    ``{uid: (centres_xyz [G, 3], diameters [G])}``)."""
    from ..engine.load import write_run_model_record
    from ..engine.trainer import TrainConfig, Trainer, seed_everything

    cfg = config or default_slice_config(context)
    tcfg = train or TrainConfig(epochs=6, batch_size=4, lr=1e-3, optimizer="adamw", warmup_iters=50, num_workers=0)
    data = SliceDataset(scans, annotations, context=context, neg_ratio=neg_ratio, seed=tcfg.seed)
    seed_everything(tcfg.seed)  # the initial weights are part of the run: seeded like the data order
    model = build_detector(cfg)
    write_run_model_record(run_dir, kind="detector", config=cfg.to_dict(), preprocess=_slice_preprocess(cfg),
                           classes=list(cfg.class_names or ["nodule"]), task="detection")
    trainer = Trainer(model=model, train_data=data, config=tcfg, run_dir=Path(run_dir), run_config={"model": cfg.to_dict()},
                      progress=progress)
    if resume:
        trainer.resume()
    hist = trainer.fit()
    save_slice_model(model, Path(run_dir) / "model.safetensors")
    return model.eval(), hist


@torch.no_grad()
def detect_slices(model, volume, *, batch_size: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the slice detector on every axial slice: per-slice ``(boxes [k, 4], scores [k])``."""
    from .fpr import _volume_tensor

    vol = _volume_tensor(volume)
    ctx = (model.config.in_channels - 1) // 2
    model.eval()
    dev = next(model.parameters()).device
    boxes, scores = [], []
    for a in range(0, vol.shape[0], batch_size):  # batches of slices
        z = torch.arange(a, min(a + batch_size, vol.shape[0]))
        dets = model(slice_stack(vol, z, ctx).to(dev))["detections"]
        boxes += [d["boxes"].cpu() for d in dets]
        scores += [d["scores"].cpu() for d in dets]
    return boxes, scores


def _overlap(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """``[A, B]`` IoU, or intersection over the smaller box (``"iomin"``: 1 for nested boxes)."""
    if metric == "iou":
        return box_iou(a, b)
    if metric != "iomin":
        raise ValueError(f"metric must be 'iou' or 'iomin', got {metric!r}")
    inter = _intersection(a[:, None, :], b[None, :, :], 2)  # [A, B]
    area_a, area_b = box_area(a), box_area(b)
    return inter / torch.minimum(area_a[:, None], area_b[None]).clamp(min=1e-12)


def link_slice_boxes(boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], geometry: Geometry, *,
                     iou_thresh: float = 0.3, min_slices: int = 1, metric: str = "iomin") -> dict[str, np.ndarray]:
    """Merge per-slice 2D boxes into 3D candidates (module docstring, step 4).

    ``metric``: ``"iou"`` links boxes of consecutive slices with IoU > ``iou_thresh``; ``"iomin"`` (default) uses the
    intersection over the smaller box instead, so the small cap slices of a sphere (nested in the next slice's box,
    IoU ``(r_cap / r) ** 2`` often < 0.3) stay linked to it.

    Returns ``{"centres_world" [K, 3], "scores" [K], "boxes" [K, 6] (voxel, array order), "n_slices" [K]}``.
    """
    nz = len(boxes)
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    empty = {"centres_world": np.zeros((0, 3)), "scores": np.zeros(0), "boxes": np.zeros((0, 6)), "n_slices": np.zeros(0, int)}
    if nz == 0 or int(counts.sum()) == 0:
        return empty
    allb = torch.cat([torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4) for b in boxes])
    alls = torch.cat([torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in scores])
    zs = torch.repeat_interleave(torch.arange(nz), counts)
    start = torch.cumsum(counts, 0) - counts
    src, dst = [], []
    for z in range(nz - 1):  # one vectorised IoU per consecutive slice pair
        if counts[z] == 0 or counts[z + 1] == 0:
            continue
        iou = _overlap(allb[start[z]:start[z] + counts[z]], allb[start[z + 1]:start[z + 1] + counts[z + 1]], metric)
        i, j = torch.nonzero(iou > iou_thresh, as_tuple=True)
        src.append(i + start[z])
        dst.append(j + start[z + 1])
    n = len(allb)
    label = torch.arange(n)
    if src:
        s, d = torch.cat(src), torch.cat(dst)
        e0, e1 = torch.cat([s, d]), torch.cat([d, s])
        while True:  # connected components: propagate the minimum label along edges until nothing changes
            new = label.scatter_reduce(0, e1, label[e0], reduce="amin")
            new = new[new]  # pointer jumping
            if torch.equal(new, label):
                break
            label = new
    comp, inv = torch.unique(label, return_inverse=True)
    k = len(comp)
    box3 = torch.cat([zs[:, None].to(torch.float64), allb[:, :2], zs[:, None].to(torch.float64) + 1, allb[:, 2:]], 1)
    lo = torch.full((k, 3), float("inf"), dtype=torch.float64).scatter_reduce(0, inv[:, None].expand(-1, 3), box3[:, :3], "amin")
    hi = torch.full((k, 3), -float("inf"), dtype=torch.float64).scatter_reduce(0, inv[:, None].expand(-1, 3), box3[:, 3:], "amax")
    sc = torch.zeros(k, dtype=torch.float64).scatter_reduce(0, inv, alls, "amax", include_self=False)
    ns = torch.zeros(k, dtype=torch.long).scatter_add(0, inv, torch.ones(n, dtype=torch.long))
    keep = ns >= min_slices
    b3 = torch.cat([lo, hi], 1)[keep]
    centres = voxel_to_world(((b3[:, :3] + b3[:, 3:]) / 2).numpy(), geometry)
    return {"centres_world": np.asarray(centres), "scores": sc[keep].numpy(), "boxes": b3.numpy(),
            "n_slices": ns[keep].numpy()}


def detect_scan_2d(model, volume, geometry: Geometry, *, iou_thresh: float = 0.3, min_slices: int = 1,
                   metric: str = "iomin", batch_size: int = 8) -> dict[str, np.ndarray]:
    """Slice detections of one scan linked into 3D candidates (:func:`link_slice_boxes`)."""
    b, s = detect_slices(model, volume, batch_size=batch_size)
    return link_slice_boxes(b, s, geometry, iou_thresh=iou_thresh, min_slices=min_slices, metric=metric)
