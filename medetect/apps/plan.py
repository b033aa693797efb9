"""``medetect plan``: read a dataset once and write a whole training config for it (the nnDetection idea, small).

Input: a config whose ``data:`` section names the dataset (any :mod:`medetect.data.formats` format; the other
sections may be absent). Output: a ``task: detection`` YAML that ``medetect train`` runs as is, with these choices,
each one a rule stated here and repeated as a comment in the file:

* **dimension and architecture**: 2D -> Faster R-CNN (ResNet-18-FPN, the shipped BCCD recipe), 3D -> RetinaNet (the
  LUNA16 stage-one recipe); the positive anchor IoU is then 0.7 (RPN) or 0.5 (RetinaNet).
* **spacing**: the median spacing per axis is reported; with anisotropy (largest / smallest median > 3) the target
  for the coarse axis is its 10th percentile (nnU-Net's rule). The ``detection`` task trains on the stored grid
  (2D: ``data.scale``), so the spacing is reported, not resampled.
* **scale (2D)**: the median longer image side is brought to at most 512 px, but the 5th percentile of the shorter
  box side is kept at >= 6 px.
* **intensity**: a 3D volume with negative values is CT: the foreground (inside-box) 0.5..99.5 percentiles ``lo, hi``
  map to -1..1 (``max_value 1, mean (lo + hi) / 2, std (hi - lo) / 2``); otherwise values are divided by the dtype's
  maximum (255, 65535) and normalised with the per-channel mean and std.
* **anchors**: chosen greedily from candidate shapes (2D: square-root areas x the aspect ratios the boxes need;
  3D: the box shapes themselves) to maximise the **coverage**, the fraction of training boxes whose best anchor has a
  shape IoU (anchor and box centred on each other, i.e. ignoring the stride offset) >= the positive threshold;
  sizes go to pyramid level ``round(log2(size / 4))`` (stride 4 for 16 px anchors, the BCCD config's layout).
* **batch size (and 2D scale) from ``--memory-gb``, measured**: a batch pads every image to the largest of the
  batch, so the planner sizes it by the LARGEST input the training can meet: per axis the largest image after
  ``data.scale`` and the top of the zoom augmentation (both in-plane axes the longer one when quarter turns are on),
  rounded up to the collate's multiple of 32, with the most boxes any training image has. It runs real training
  steps (forward with the losses, backward, optimizer step; :func:`measure_training_step`) on random inputs of that
  shape: three small probes fit a memory model (fixed + per voxel of one image + per voxel of each further image of
  the batch), the largest batch (1..16) predicted to fit is then measured on the real shape and lowered until the
  measured peak is within 80 % of the budget. When one 2D image
  does not fit, the scale is lowered (and the anchors re-planned for it); a 3D volume that does not fit is an
  error naming ``--memory-gb``.
  The peak is measured, not estimated: on CUDA by the caching allocator (``torch.cuda.max_memory_allocated``), on
  the CPU as the growth of the process's peak resident set (Linux). The config comment and the report give it.
* **augmentation** by modality (``--modality``; else implied by the data format: ``dsb2018`` and BCCD microscopy,
  ``mias`` mammography, ``luna16_patches`` CT; else unknown): a modality without a canonical orientation
  (microscopy, and an unknown one) flips both ways and rotates by 90 degrees; one with an orientation keeps it
  (``xray``: no flips, left and right differ; ``mammography``: left-right flips only); 3D flips in-plane. Zoom:
  0.85..1.15 (colour or microscopy), 0.9..1.1 (radiographs, unknown greyscale).

``--report DIR`` writes ``DIR/index.html``: counts, image sizes and spacings, boxes per image, box-size histograms
per class and the anchor IoU distribution with the coverage (:mod:`medetect.apps.plan_report`).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from ..config import config_from_dict, load_config
from ..data.formats import open_dataset

__all__ = ["plan_dataset", "measure_training_step", "shape_iou", "anchor_coverage", "choose_anchors_2d",
           "choose_shapes_3d", "MODALITIES"]


def shape_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of box shapes ``[N, d]`` and anchor shapes ``[A, d]`` centred on each other -> ``[N, A]``."""
    inter = np.prod(np.minimum(boxes[:, None, :], anchors[None, :, :]), axis=-1)
    union = np.prod(boxes, -1)[:, None] + np.prod(anchors, -1)[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def anchor_coverage(boxes: np.ndarray, anchors: np.ndarray, threshold: float) -> tuple[float, np.ndarray]:
    """(fraction of boxes whose best anchor has shape IoU >= ``threshold``, best IoU per box ``[N]``)."""
    best = shape_iou(boxes, anchors).max(1) if len(anchors) else np.zeros(len(boxes))
    return float((best >= threshold).mean()) if len(boxes) else 1.0, best


def _shapes_2d(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """Anchor (h, w) for sizes x ratios (h / w = ratio, area = size^2), as the anchor generator makes them."""
    return np.array([[s * math.sqrt(r), s / math.sqrt(r)] for s in sizes for r in ratios], dtype=np.float64)


def _greedy(boxes: np.ndarray, candidates: np.ndarray, shapes_of, threshold: float, max_items: int,
            target: float = 0.995) -> list[int]:
    """Indices of ``candidates`` picked one at a time, each adding the most covered boxes (ties: higher mean IoU)."""
    chosen: list[int] = []
    covered = np.zeros(len(boxes), bool)
    best_iou = np.zeros(len(boxes))
    per = [shape_iou(boxes, shapes_of(c)).max(1) for c in candidates]  # [C][N]
    while len(chosen) < max_items:
        gains = [((~covered & (p >= threshold)).sum(), np.maximum(best_iou, p).mean()) if i not in chosen else (-1, 0)
                 for i, p in enumerate(per)]
        i = max(range(len(per)), key=lambda k: gains[k])
        if gains[i][0] <= 0 and chosen:
            break
        chosen.append(i)
        covered |= per[i] >= threshold
        best_iou = np.maximum(best_iou, per[i])
        if covered.mean() >= target:
            break
    return chosen


def choose_anchors_2d(sizes_hw: np.ndarray, threshold: float, max_sizes: int = 12, goal: float = 0.95):
    """Aspect ratios and per-level anchor sizes for 2D boxes ``[N, 2]`` (h, w): the first ratio set of
    ``[1]``, ``[0.5, 1, 2]``, ``[0.33, 0.5, 1, 2, 3]`` whose greedy sizes reach ``goal`` coverage (else the best).
    Returns ``(levels, anchor sizes per level, ratios, coverage, best IoU per box)``."""
    side = np.sqrt(sizes_hw.prod(1))
    lo, hi = np.quantile(side, [0.005, 0.995])
    cands = np.exp(np.linspace(math.log(max(lo / 1.5, 2.0)), math.log(hi * 1.5), 48))
    best_plan = None
    for ratios in ([1.0], [0.5, 1.0, 2.0], [0.33, 0.5, 1.0, 2.0, 3.0]):
        pick = _greedy(sizes_hw, cands, lambda s, r=ratios: _shapes_2d([s], r), threshold, max_sizes)
        sizes = sorted(round(float(cands[i]), 1) for i in pick)
        cov, _ = anchor_coverage(sizes_hw, _shapes_2d(sizes, ratios), threshold)
        if best_plan is None or cov > best_plan[0] + 1e-9:
            best_plan = (cov, sizes, ratios)
        if cov >= goal:
            break
    _, sizes, ratios = best_plan
    by_level: dict[int, list[float]] = {}
    for s in sizes:
        by_level.setdefault(int(np.clip(round(math.log2(s / 4)), 2, 5)), []).append(s)
    levels = list(range(min(by_level), max(by_level) + 1))
    k = max(len(v) for v in by_level.values())  # the head is shared: every level gets k sizes
    anchor_sizes = [sorted(by_level.get(lv, []) + _fill(k - len(by_level.get(lv, [])), 4 * 2 ** (lv - 0.5),
                                                        4 * 2 ** (lv + 0.5), by_level.get(lv, []))) for lv in levels]
    cov, best = anchor_coverage(sizes_hw, _shapes_2d([s for ss in anchor_sizes for s in ss], ratios), threshold)
    return levels, anchor_sizes, ratios, cov, best


def choose_shapes_3d(sizes: np.ndarray, threshold: float, max_shapes: int = 8, seed: int = 0):
    """Per-level anchor shapes (array order) for 3D boxes ``[N, 3]``. Returns ``(levels, shapes per level, coverage,
    best IoU per box)``."""
    rng = np.random.default_rng(seed)
    cands = sizes if len(sizes) <= 400 else sizes[rng.choice(len(sizes), 400, replace=False)]
    cands = np.unique(np.round(cands, 1), axis=0)
    pick = _greedy(sizes, cands, lambda s: s[None], threshold, max_shapes)
    shapes = sorted((cands[i].round(1).tolist() for i in pick), key=lambda s: float(np.prod(s)))
    by_level: dict[int, list] = {2: [], 3: []}
    for s in shapes:
        by_level[2 if float(np.prod(s)) ** (1 / 3) < 10 else 3].append(s)
    k = max(len(v) for v in by_level.values())  # the head is shared: every level gets k shapes (extra: cubes)
    ranges = {2: (4.0, 10.0), 3: (10.0, 24.0)}
    for lv in (2, 3):
        sides = _fill(k - len(by_level[lv]), *ranges[lv], [float(np.prod(s)) ** (1 / 3) for s in by_level[lv]])
        by_level[lv] = sorted(by_level[lv] + [[side] * 3 for side in sides], key=lambda s: float(np.prod(s)))
    levels = [2, 3]
    cov, best = anchor_coverage(sizes, np.array([s for lv in levels for s in by_level[lv]]), threshold)
    return levels, [by_level[lv] for lv in levels], cov, best


def _fill(n: int, lo: float, hi: float, have: Sequence[float]) -> list[float]:
    """``n`` sizes spread geometrically over ``[lo, hi]``, away from the sizes a level already ``have``s."""
    if n <= 0:
        return []
    grid = np.geomspace(lo, hi, 4 * n + 4)[1:-1]
    out: list[float] = []
    for _ in range(n):
        taken = list(have) + out
        far = [abs(math.log(g / t)) if taken else 1.0 for g in grid for t in (taken or [1.0])]
        dist = np.array(far).reshape(len(grid), -1).min(1)
        out.append(round(float(grid[int(np.argmax(dist))]), 1))
    return out


def _stats(ds) -> dict:
    """One pass over the training images: shapes, spacings, channels, dtypes, intensity samples, boxes."""
    rng = np.random.default_rng(0)
    shapes, spacings, channels, dtypes, fg, allv, per_image = [], [], [], set(), [], [], []
    boxes, labels = [], []
    for i in range(len(ds)):
        img = ds.image(i)
        rec = ds.records[i]
        a = np.asarray(img.array)
        shapes.append(img.spatial_shape)
        spacings.append(tuple(img.spacing))
        channels.append(a.shape[0])
        dtypes.add(str(a.dtype))
        flat = a.reshape(a.shape[0], -1)
        idx = rng.choice(flat.shape[1], min(2000, flat.shape[1]), replace=False)
        allv.append(flat[:, idx].astype(np.float64))
        d = rec.ndim
        for b in rec.boxes[:8]:  # foreground samples from up to 8 boxes per image
            sl = tuple(slice(int(math.floor(lo)), max(int(math.floor(lo)) + 1, int(math.ceil(hi))))
                       for lo, hi in zip(b[:d], b[d:]))
            v = a[(slice(None),) + sl].reshape(a.shape[0], -1).astype(np.float64)
            fg.append(v[:, rng.choice(v.shape[1], min(200, v.shape[1]), replace=False)])
        per_image.append(len(rec))
        boxes.append(rec.boxes)
        labels += rec.labels
    d = ds.records[0].ndim
    return {"shapes": np.array(shapes), "spacings": np.array(spacings), "channels": channels, "dtypes": sorted(dtypes),
            "values": np.concatenate(allv, 1), "fg": np.concatenate(fg, 1) if fg else np.zeros((channels[0], 0)),
            "per_image": np.array(per_image), "boxes": np.concatenate(boxes).reshape(-1, 2 * d), "labels": labels,
            "ndim": d}


def _target_spacing(spacings: np.ndarray) -> list[float]:
    med = np.median(spacings, 0)
    target = med.copy()
    if med.max() / med.min() > 3:  # anisotropic: the coarse axis takes its 10th percentile (nnU-Net)
        ax = int(np.argmax(med))
        target[ax] = np.percentile(spacings[:, ax], 10)
    return [round(float(v), 4) for v in target]


# ============================================================================================ augmentation

# modality -> (hflip, vflip, rot90): flips only where the image has no canonical orientation on that axis.
MODALITY_FLIPS = {
    "microscopy": (True, True, True),    # no up / down, no left / right: every flip and quarter turn is a valid image
    "xray": (False, False, False),       # radiographs: the heart is on the left, the head at the top
    "mammography": (True, False, False),  # the two breasts are mirror images; the nipple-chest axis has a direction
    "ct": (True, True, False),           # 3D scans: in-plane flips (nnDetection mirrors every axis)
    "mri": (True, True, False),
}
MODALITIES = ("", *MODALITY_FLIPS)
_FORMAT_MODALITY = {"dsb2018": "microscopy", "mias": "mammography", "luna16_patches": "ct"}


def _modality(given: str, data, d: int) -> str:
    """The modality the planner knows: ``given`` (``--modality``), else the one a named dataset format implies, else
    empty (unknown)."""
    if given and given not in MODALITY_FLIPS:
        raise ValueError(f"--modality must be one of {list(MODALITY_FLIPS)}, got {given!r}")
    if given:
        return given
    fmt = data.format or {"bccd": "bccd", "dsb2018": "dsb2018", "mini_mias": "mias"}.get(data.dataset, "")
    return "microscopy" if fmt == "bccd" else _FORMAT_MODALITY.get(fmt, "")


def _augmentation(d: int, c: int, modality: str) -> dict:
    """Flips from the modality (unknown: no canonical orientation assumed, so all flips on; only a modality known to
    have one turns them off); zoom and intensity jitter as before: colour / unknown 2D 0.85..1.15, radiographs
    0.9..1.1, 3D none."""
    if d == 3:
        hflip, vflip, _ = MODALITY_FLIPS.get(modality, MODALITY_FLIPS["ct"])
        return {"hflip": hflip, "vflip": vflip, "rot90": False, "random_scale": [1.0, 1.0], "intensity": False}
    hflip, vflip, rot90 = MODALITY_FLIPS.get(modality, MODALITY_FLIPS["microscopy"])
    zoom = [0.9, 1.1] if modality in ("xray", "mammography") or (not modality and c == 1) else [0.85, 1.15]
    return {"hflip": hflip, "vflip": vflip, "rot90": rot90, "random_scale": zoom, "intensity": True}


# ============================================================================================ measured memory

_SIZE_DIVISOR = 32  # detection_collate pads every batch up to a multiple of 32
_HEADROOM = 0.8  # the measured step may use this fraction of --memory-gb (allocator slack, data pipeline)
_MAX_BATCH = 16
_MIN_SCALE = 0.05
_PROBE_VOXELS = {2: 256 * 256, 3: 48 ** 3}


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


class _PeakMemory:
    """Peak memory of the code run inside it, in bytes (``.peak``), above what was in use when it started.

    CUDA: the caching allocator's ``max_memory_allocated`` (reset on entry). CPU: the process's peak resident set
    (``VmHWM``), reset on entry through ``/proc/self/clear_refs`` (Linux); freed heap memory is handed back first
    (glibc ``malloc_trim``) so that the starting resident set holds live memory only."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the starting resident set may include freed heap memory
            pass
        try:
            self._base = _proc_status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset the peak resident set to the current one
        except OSError as e:
            raise RuntimeError("measuring the memory of a training step on the CPU needs Linux (/proc/self/"
                               f"clear_refs: {e}); plan on a machine with CUDA or Linux") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self._base


def measure_training_step(cfg, batch_shape: Sequence[int], box_sizes: np.ndarray, boxes_per_image: int, *,
                          device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Run one real training step of ``cfg`` (an ExperimentConfig: model, optimizer, mixed precision as the trainer
    sets them) on a random input of ``batch_shape`` ``[B, C, *S]`` with ``boxes_per_image`` boxes per image (shapes
    drawn from ``box_sizes`` ``[N, d]``, placed at random): forward with the losses, backward, optimizer step.

    Returns ``{"peak_bytes", "seconds", "device", "batch_shape", "boxes_per_image"}``: the peak memory of the step
    above what was in use before the model was built (model, gradients, optimizer state, input, activations), as
    :class:`_PeakMemory` measures it, and the wall time of the step without building the model. The global random
    state is left as it was."""
    from ..models.detector import build_detector

    dev = torch.device(device)
    b, d = int(batch_shape[0]), len(batch_shape) - 2
    spatial = np.asarray(batch_shape[2:], dtype=np.float64)
    rng = np.random.default_rng(seed)
    targets = []
    for _ in range(b):
        size = np.minimum(box_sizes[rng.integers(0, len(box_sizes), boxes_per_image)], spatial)  # [K, d]
        size = np.maximum(size, 1.0)
        lo = rng.uniform(0, 1, (boxes_per_image, d)) * (spatial - size)
        targets.append({"boxes": torch.as_tensor(np.concatenate([lo, lo + size], 1), dtype=torch.float32),
                        "labels": torch.as_tensor(rng.integers(0, cfg.model.num_classes, boxes_per_image))})
    amp, tc = cfg.train.amp, cfg.train
    autocast = dev.type == "cuda" and amp in ("auto", "bf16") or amp == "bf16"
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        with _PeakMemory(dev) as mem:
            model = build_detector(cfg.model).to(dev).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = (torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
                   if tc.optimizer == "sgd" else torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay))
            x = torch.randn(tuple(int(v) for v in batch_shape), device=dev)
            tg = [{k: v.to(dev) for k, v in t.items()} for t in targets]
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x, tg)
            loss = sum(out["losses"].values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            del model, opt, x, tg, out, loss, params
    return {"peak_bytes": int(mem.peak), "seconds": seconds, "device": str(dev),
            "batch_shape": [int(v) for v in batch_shape], "boxes_per_image": int(boxes_per_image)}


def _largest_input(shapes: np.ndarray, scale: float, zoom: float, rot90: bool) -> list[int]:
    """The spatial shape ``[*S]`` a batch holding the dataset's largest images pads to: per axis the largest size
    after the fixed resize by ``scale`` and the zoom augmentation's ``zoom`` (the transforms' ``floor(n * f + 0.5)``),
    both in-plane axes the larger of the two under quarter turns, rounded up to the collate's multiple of 32."""
    after = np.floor(np.floor(shapes * scale + 0.5) * zoom + 0.5).max(0)
    if rot90:
        after[-2:] = after[-2:].max()
    return [int(math.ceil(v / _SIZE_DIVISOR) * _SIZE_DIVISOR) for v in after]


def _probe_shapes(full: list[int], d: int) -> tuple[list[int], list[int]]:
    """Two probe inputs of about the largest input's aspect: ``big`` of at most ``_PROBE_VOXELS`` voxels (``full``
    itself when smaller) and ``small``, ``big`` with its longest axis halved (both padded like a batch; the same
    when ``big`` is already the smallest such input)."""
    f = min(1.0, (_PROBE_VOXELS[d] / float(np.prod(full))) ** (1 / d))
    big = [int(math.ceil(max(v * f, _SIZE_DIVISOR) / _SIZE_DIVISOR) * _SIZE_DIVISOR) for v in full]
    small = list(big)
    ax = int(np.argmax(big))
    small[ax] = int(math.ceil(max(big[ax] / 2, _SIZE_DIVISOR) / _SIZE_DIVISOR) * _SIZE_DIVISOR)
    return small, big


def _fit_memory(config_at, shapes: np.ndarray, sizes: np.ndarray, boxes_per_image: int, scale: float, budget: float,
                device: str, d: int) -> dict:
    """Scale (2D) and batch size whose measured training step on the largest images fits ``budget`` bytes.

    Memory model, fitted to three small probe steps (batch 1 and 2 on a ``small`` input, batch 1 on a ``big`` one of
    about twice its voxels, see :func:`_probe_shapes`): ``fixed + per_voxel * V + per_batch_voxel * (B - 1) * V`` for
    ``B`` inputs of ``V`` voxels. ``per_voxel`` also holds what one image needs while it is processed alone (the
    anchor-to-box matching runs image by image), so it can be much larger than the per-image growth of a batch.
    From it: (2D) a smaller scale when one image is predicted not to fit, the largest batch (1..16) predicted to fit;
    then the step on the real largest input is measured, lowering the batch (then the scale) until the MEASURED peak
    fits. No input predicted not to fit is run: when nothing can fit (3D, or 2D at the smallest scale) it is a
    ValueError naming ``--memory-gb``."""
    notes: list[str] = []
    measured = None
    done: dict[tuple, dict] = {}

    def step(cfg, s: float, shape: list[int]) -> int:
        key = (s, tuple(shape))
        if key not in done:
            done[key] = measure_training_step(cfg, shape, sizes * (s if d == 2 else 1.0), boxes_per_image,
                                              device=device)
        return done[key]["peak_bytes"]

    # warm-up: the first step of a process also loads kernels and sets up thread pools, memory that stays with the
    # process whatever the input; measured from the second step on, the probes see the step alone
    cfg = config_at(scale)
    measure_training_step(cfg, [1, cfg.model.in_channels] + [_SIZE_DIVISOR] * d, sizes[:1], 1, device=device)
    for _ in range(6):
        cfg = config_at(scale)
        c = cfg.model.in_channels
        full = _largest_input(shapes, scale if d == 2 else 1.0, cfg.data.random_scale[1], cfg.data.rot90 and d == 2)
        small, big = _probe_shapes(full, d)
        vs, vb, vf = float(np.prod(small)), float(np.prod(big)), float(np.prod(full))
        m11, m21 = step(cfg, scale, [1, c, *small]), step(cfg, scale, [2, c, *small])
        per_batch = max(m21 - m11, 0) / vs
        if vb > vs:
            per_voxel = max(step(cfg, scale, [1, c, *big]) - m11, 0) / (vb - vs)
            fixed = max(m11 - per_voxel * vs, 0.0)
        else:  # the largest input is as small as a probe can be: all of it counted per voxel
            per_voxel, fixed = m11 / vs, 0.0
        one = fixed + per_voxel * vf
        if one > budget and (d == 3 or scale <= _MIN_SCALE):
            raise ValueError(f"one training step on the largest input {[1, c, *full]} is predicted to need "
                             f"{one / 2 ** 30:.2f} GB, more than {_HEADROOM:.0%} of --memory-gb "
                             f"({budget / 2 ** 30:.2f} GB): raise --memory-gb" +
                             (" or train 3D detection on patches" if d == 3 else ""))
        if one > budget:
            new = max(scale * math.sqrt(max(budget - fixed, 0.05 * budget) / (per_voxel * vf)) * 0.95, _MIN_SCALE)
            notes.append(f"scale {scale:g} -> {new:.3f}: one {full} input was predicted to need {one / 2 ** 30:.2f} GB")
            scale = round(new, 3)
            continue
        room = (budget - one) / (per_batch * vf) if per_batch > 0 else _MAX_BATCH
        batch = int(np.clip(1 + math.floor(max(room, 0.0)), 1, _MAX_BATCH))
        while True:
            peak = step(cfg, scale, [batch, c, *full])
            if peak <= budget or batch == 1:
                break
            batch = max(1, min(batch - 1, int(batch * budget // peak)))
        measured = done[(scale, (batch, c, *full))]
        if peak <= budget or d == 3 or scale <= _MIN_SCALE:
            break
        new = max(scale * math.sqrt(budget / peak) * 0.95, _MIN_SCALE)
        notes.append(f"scale {scale:g} -> {new:.3f}: one {full} input measured {peak / 2 ** 30:.2f} GB")
        scale, measured = round(new, 3), None
    if measured is None:
        raise ValueError(f"no scale down to {scale:g} fits one training step on the largest image within "
                         f"{_HEADROOM:.0%} of --memory-gb ({budget / 2 ** 30:.2f} GB): raise --memory-gb")
    if measured["peak_bytes"] > budget:
        notes.append(f"one training step on the largest input {measured['batch_shape']} needs "
                     f"{measured['peak_bytes'] / 2 ** 30:.2f} GB, more than {budget / 2 ** 30:.2f} GB of the budget")
    return {"scale": scale, "batch": measured["batch_shape"][0], "step": measured, "notes": notes}


# ============================================================================================ the plan


def plan_dataset(config: str | Path, out: str | Path, *, memory_gb: float = 8.0, report: str | Path | None = None,
                 sets: Sequence[str] = (), modality: str = "", device: str | None = None) -> dict:
    """Plan a training config for the dataset of ``config``'s data section (see the module docstring); writes
    ``out`` (YAML) and, with ``report``, the HTML fingerprint. ``modality`` (``microscopy``, ``xray``,
    ``mammography``, ``ct``, ``mri``; empty: from the data format, else unknown) decides the flips; ``device`` (default:
    CUDA when available, else the CPU) runs the measured training step. Returns the summary (coverage, seconds,
    choices, the measured step)."""
    t0 = time.perf_counter()
    if memory_gb <= 0:
        raise ValueError(f"--memory-gb must be > 0, got {memory_gb}")
    cfg = load_config(config, sets)
    data = getattr(cfg, "data", None)
    if data is None or not hasattr(data, "source"):
        raise ValueError(f"{config}: plan needs a config with a detection data section (task: detection)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ds = open_dataset(**data.source(), split=data.train_split)
    if len(ds) == 0:
        raise ValueError(f"{config}: the split {data.train_split!r} has no images")
    st = _stats(ds)
    d = st["ndim"]
    mod = _modality(modality, data, d)
    if len(st["boxes"]) == 0:
        raise ValueError(f"{config}: the split {data.train_split!r} has no boxes to plan anchors from")
    sizes = st["boxes"][:, d:] - st["boxes"][:, :d]  # [N, d] array order
    chans = sorted(set(st["channels"]))
    if len(chans) > 1 and not data.channels:
        raise ValueError(f"{config}: the images have {chans} channels; set data.channels (1 or 3) first")
    c = data.channels or chans[0]
    med_shape = np.median(st["shapes"], 0)
    max_shape = st["shapes"].max(0)
    base = cfg.to_dict()
    # ---- scale (2D) and normalisation
    scale = 1.0
    if d == 2:
        scale = min(1.0, 512.0 / float(med_shape.max()))
        p5 = float(np.percentile(sizes.min(1), 5))
        scale = min(1.0, max(scale, 6.0 / max(p5, 1e-6)))
        scale = round(scale, 3)
    vals, fg = st["values"], st["fg"]
    ct = d == 3 and float(vals.min()) < 0
    if ct:
        lo, hi = np.percentile(fg if fg.size else vals, [0.5, 99.5])
        norm = {"max_value": 1.0, "mean": [round(float(lo + hi) / 2, 2)], "std": [round(max(float(hi - lo) / 2, 1.0), 2)]}
    else:
        top = 255.0 if "uint8" in st["dtypes"] else 65535.0 if "uint16" in st["dtypes"] else float(vals.max()) or 1.0
        v = vals / top
        if c != v.shape[0]:
            v = v.mean(0, keepdims=True) if c == 1 else np.repeat(v[:1], c, 0)
        norm = {"max_value": top, "mean": [round(float(m), 4) for m in v.mean(1)],
                "std": [round(max(float(s), 1e-3), 4) for s in v.std(1)]}
    aug = _augmentation(d, c, mod)
    classes = list(ds.classes)
    arch, thr = ("faster_rcnn", 0.7) if d == 2 else ("retinanet", 0.5)
    maxn = int(st["per_image"].max()) if len(st["per_image"]) else 1
    planned_at: dict[float, tuple] = {}

    def plan_at(s: float) -> tuple[dict, tuple]:
        """The whole raw config and the anchor plan for the 2D scale ``s`` (anchors follow the box sizes)."""
        if s not in planned_at:
            planned = sizes * (s if d == 2 else 1.0)
            if d == 2:
                levels, anchor_sizes, ratios, cov, best = choose_anchors_2d(planned, thr)
                model_anchor = {"anchor_sizes": anchor_sizes, "aspect_ratios": ratios, "anchor_shapes": None}
            else:
                levels, shapes, cov, best = choose_shapes_3d(planned, thr)
                model_anchor = {"anchor_shapes": shapes, "anchor_sizes": [[float(4 * 2 ** lv)] for lv in levels]}
            raw = copy.deepcopy(base)
            model = raw["model"]
            model.update({"arch": arch, "ndim": d, "in_channels": c, "num_classes": len(classes),
                          "class_names": classes, "backbone": "resnet18", "base_width": 32 if d == 2 else 8,
                          "fpn_channels": 64 if d == 2 else 16, "levels": levels, **model_anchor, "norm": "group"})
            if d == 2:
                model.update({"roi_hidden": 256, "roi_batch_size_per_image": 256, "rpn_pre_nms_top_n": [1000, 500],
                              "rpn_post_nms_top_n": [1000, 300]})
                p99 = int(np.percentile(st["per_image"], 99)) if len(st["per_image"]) else 100
                model["detections_per_img"] = int(min(1000, max(100, 2 * p99)))
            else:
                model.update({"score_thresh": 0.02, "nms_thresh": 0.1, "detections_per_img": 20})
            dd = raw["data"]
            dd.update({"scale": s if d == 2 else 1.0, **norm, **aug, "channels": data.channels,
                       "classes": list(data.classes)})
            dd.pop("dataset", None) if dd.get("format") else None
            raw.pop("task", None)
            planned_at[s] = (raw, (levels, cov, best, planned))
        return planned_at[s]

    # ---- batch (and 2D scale) from a measured training step on the largest images
    t_fit = time.perf_counter()
    fit = _fit_memory(lambda s: config_from_dict(plan_at(s)[0]), st["shapes"], sizes, maxn, scale,
                      memory_gb * 2 ** 30 * _HEADROOM, device, d)
    fit_seconds = time.perf_counter() - t_fit
    scale, batch, step = fit["scale"], fit["batch"], fit["step"]
    raw, (levels, cov, best, planned) = plan_at(scale)
    raw["train"].update({"batch_size": batch})
    seconds = time.perf_counter() - t0
    spacing_med = [round(float(v), 4) for v in np.median(st["spacings"], 0)]
    step_gb = step["peak_bytes"] / 2 ** 30
    summary = {"images": len(ds), "boxes": int(len(sizes)), "ndim": d, "classes": classes,
               "median_shape": [int(v) for v in med_shape], "max_shape": [int(v) for v in max_shape],
               "median_spacing": spacing_med, "target_spacing": _target_spacing(st["spacings"]), "scale": scale,
               "arch": arch, "positive_iou": thr, "anchor_coverage": round(cov, 4), "levels": levels,
               "batch_size": batch, "modality": mod, "augmentation": aug, "intensity": norm,
               "step_memory_gb": round(step_gb, 3), "step_device": step["device"],
               "step_input_shape": step["batch_shape"], "step_boxes_per_image": step["boxes_per_image"],
               "step_seconds": round(step["seconds"], 2), "memory_budget_gb": memory_gb, "notes": fit["notes"],
               "measure_seconds": round(fit_seconds, 2), "planning_seconds": round(seconds, 2)}
    notes = "".join(f"\n# Note: {n}." for n in fit["notes"])
    header = (f"# Planned by `medetect plan {config}` in {seconds:.1f} s from {len(ds)} images / {len(sizes)} boxes "
              f"({d}D).\n# Anchor coverage {cov:.4f}: the fraction of training boxes whose best anchor has shape IoU "
              f">= {thr} (the {arch} positive threshold).\n# Median image shape {summary['median_shape']}, largest "
              f"{summary['max_shape']}, median spacing {spacing_med} (target {summary['target_spacing']}); scale "
              f"{scale}.\n# Batch {batch}: one training step on the largest input {step['batch_shape']} "
              f"({step['boxes_per_image']} boxes per image) MEASURED {step_gb:.2f} GB peak on {step['device']} "
              f"({step['seconds']:.1f} s), within {_HEADROOM:.0%} of the {memory_gb:g} GB budget.\n# Modality "
              f"{mod or 'unknown (no canonical orientation assumed)'}: hflip {aug['hflip']}, vflip {aug['vflip']}, "
              f"rot90 {aug['rot90']}.{notes}\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump({"task": "detection", **raw}, sort_keys=False, default_flow_style=None))
    load_config(out)  # the plan must load as it is
    if report is not None:
        from .plan_report import write_report

        summary["report"] = str(write_report(Path(report), st, planned, best, thr, summary))
    return summary
