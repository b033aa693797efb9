"""Lineage steps 5-6: Fast R-CNN (the RoI heads on selective-search proposals, RoI max pooling), Faster R-CNN (the
RPN), and the one-stage rows YOLO (v1 grid) and RetinaNet (focal loss): four :class:`~medetect.models.detector.Detector`
architectures trained the same way on the same data, so the table compares them and nothing else.

* :class:`DetectorStepConfig`: the config section (``model`` = the shared :class:`DetectorConfig`, whose ``arch`` each
  step sets; ``train`` = :class:`TrainConfig`, the same epochs for all four rows; the augmentation).
* :func:`train_detector_step`: trains one step with the generic :class:`~medetect.engine.trainer.Trainer` in
  ``out_dir/runs/<step>`` (resumable; the best epoch by val mAP@0.5 is kept) and writes ``out_dir/<step>.safetensors``
  (the best epoch's weights, kind ``detector``) and ``out_dir/<step>.json`` (the train record).
* :func:`load_detector_step`: a model file -> :class:`DetectorMethod` (``name`` + ``detect(image)``).

Fast R-CNN's proposals follow the augmentation: they are carried through the SAME geometric transforms as the ground
truth (joined to the boxes for the transform, split after; flips and zooms drop no box), so one code path moves both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..boxes import clip_boxes
from ..data import transforms as T
from ..models.io import load_state
from ..engine.curves import read_best
from ..engine.runs import prepare_run_dir
from ..engine.trainer import TrainConfig, Trainer, seed_everything
from ..evaluation.detection import evaluate_voc
from ..models.detector import Detector, DetectorConfig, build_detector
from ..files import write_atomically
from ..models.io import Preprocess, load_model, save_model
from ..schema import check, option
from .data import MAX_VALUE, MEAN, STD, LineageSet, normalise
from .proposals import ProposalConfig, proposals_for, propose

__all__ = ["STEPS", "NAMES", "DetectorStepConfig", "DetectorMethod", "train_detector_step", "load_detector_step",
           "PREPROCESS"]

STEPS = ("fast_rcnn", "faster_rcnn", "yolo", "retinanet")
NAMES = {"fast_rcnn": "Fast R-CNN", "faster_rcnn": "Faster R-CNN", "yolo": "YOLO", "retinanet": "RetinaNet"}
SIZE_DIVISOR = 32  # inputs are padded (high end) to a multiple of the deepest stride, as the trainer's collate does

# What a lineage model file says about its input: the raw image resized by the lineage's working scale (set from the
# training data when saved, so `medetect predict` on an original image does what the lineage did), the lineage's
# intensity rule (medetect.lineage.data.normalise). The lineage itself feeds images already at that scale.
PREPROCESS = Preprocess(ndim=2, channels=3, max_value=MAX_VALUE, mean=[MEAN], std=[STD], scale=1.0, bit_depth=8,
                        value_range=[0.0, 255.0])


def _bccd_model() -> DetectorConfig:
    """configs/bccd_faster_rcnn.yaml's detector (ResNet-18 at base width 32, FPN 64, anchors 16..128 for the anchor
    archs); the YOLO grid on the stride-16 level: 16 px cells for ~50 px RBCs at scale 0.5, about the paper's ratio of
    cell (64 px of 448) to object size."""
    return DetectorConfig(arch="faster_rcnn", ndim=2, in_channels=3, num_classes=3, class_names=["RBC", "WBC", "Platelets"],
                          backbone="resnet18", base_width=32, norm="group", fpn_channels=64, levels=[2, 3, 4, 5],
                          anchor_sizes=[[16], [32], [64], [128]], aspect_ratios=[0.5, 1.0, 2.0],
                          rpn_pre_nms_top_n=[1000, 500], rpn_post_nms_top_n=[1000, 300], roi_hidden=256,
                          roi_batch_size_per_image=256, score_thresh=0.05, nms_thresh=0.4, yolo_stride=16)


def _bccd_train() -> TrainConfig:
    """configs/bccd_faster_rcnn.yaml's optimisation at the lineage's budget: the same 4 epochs for all four rows (one
    epoch of 205 images at 1 CPU thread takes about 1.5 to 3 minutes for the two-stage and RetinaNet rows on an idle
    core, several times that on a shared one), so a warm-up of 50 steps (of 204), validated every 2 epochs (Fast
    R-CNN's validation runs 2000 proposals on each of 87 images)."""
    return TrainConfig(epochs=4, batch_size=4, optimizer="adamw", lr=0.001, weight_decay=0.0001, warmup_iters=50,
                       schedule="cosine", grad_clip=10.0, num_workers=0, val_every=2, log_every=10)


@dataclass
class DetectorStepConfig:
    model: DetectorConfig = option(default_factory=_bccd_model, doc="the detector shared by the four rows (each step "
                                   "sets model.arch; num_classes and class_names come from the training data)")
    train: TrainConfig = option(default_factory=_bccd_train, doc="optimisation, the same for the four rows")
    fast_rcnn_roi_pool: str = option("max", doc="RoI pooling of the Fast R-CNN row (max: the paper's RoI max pooling; "
                                     "align: RoIAlign); Faster R-CNN uses model.roi_pool", choices=("max", "align"))
    hflip: bool = option(True, doc="random horizontal flip (p = 0.5)")
    vflip: bool = option(True, doc="random vertical flip (p = 0.5)")
    random_scale: list[float] = option([0.85, 1.15], doc="zoom range [lo, hi] of the scale augmentation", gt=0)
    intensity: bool = option(True, doc="random intensity scale (0.85..1.15) and shift (-12..12 of 255)")

    def validate(self, prefix: str = "detectors") -> None:
        check(self, prefix)
        if len(self.random_scale) != 2 or self.random_scale[0] > self.random_scale[1]:
            raise ValueError(f"{prefix}.random_scale must be [lo, hi] with lo <= hi, got {self.random_scale}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def step_model(self, step: str, class_names: Sequence[str]) -> DetectorConfig:
        """The detector config of one step: ``model`` with its ``arch`` (and Fast R-CNN's pooling) and the classes."""
        _check_step(step)
        pool = self.fast_rcnn_roi_pool if step == "fast_rcnn" else self.model.roi_pool
        return dataclasses.replace(self.model, arch=step, roi_pool=pool, num_classes=len(class_names),
                                   class_names=list(class_names))

    def augmentation(self) -> T.Compose:
        """The training augmentation (geometry moves every box alike and drops none; intensity on raw 0..255)."""
        steps: list = []
        if self.intensity:
            steps.append(T.RandomIntensity(scale=(0.85, 1.15), shift=(-12.0, 12.0), noise_std=None, gamma=None))
        if tuple(self.random_scale) != (1.0, 1.0):
            steps.append(T.RandomScale(range=tuple(self.random_scale)))
        if self.hflip:
            steps.append(T.RandomFlip(axes=(-1,), p=0.5))
        if self.vflip:
            steps.append(T.RandomFlip(axes=(-2,), p=0.5))
        return T.Compose(steps)


def _check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"step must be one of {list(STEPS)}, got {step!r}")


class StepDataset(torch.utils.data.Dataset):
    """A :class:`LineageSet` as trainer samples ``{"image" (normalised), "boxes", "labels"[, "proposals"]}``.

    With ``proposals`` (one ``[N_i, 4]`` per image) they join the ground-truth boxes (label -1) for ``transform`` and
    are split off after it, so the augmentation moves them exactly as it moves the objects."""

    def __init__(self, data: LineageSet, proposals: Sequence[torch.Tensor] | None = None,
                 transform: T.Transform | None = None):
        if proposals is not None and len(proposals) != len(data):
            raise ValueError(f"proposals must have one tensor per image ({len(data)}), got {len(proposals)}")
        self.data, self.proposals, self.transform = data, proposals, transform
        self.classes = list(data.class_names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        boxes, labels = self.data.boxes[i].reshape(-1, 4), self.data.labels[i].reshape(-1)
        g = boxes.shape[0]
        sample = {"image": self.data.images[i], "boxes": boxes, "labels": labels}
        if self.proposals is not None:
            p = self.proposals[i].reshape(-1, 4).to(boxes.dtype)
            sample["boxes"] = torch.cat([boxes, p])
            sample["labels"] = torch.cat([labels, labels.new_full((p.shape[0],), -1)])
        if self.transform is not None:
            sample = self.transform(sample)
        out = {"image": normalise(sample["image"]), "boxes": sample["boxes"][:g], "labels": sample["labels"][:g]}
        if self.proposals is not None:
            out["proposals"] = sample["boxes"][g:]
        return out


def _pad(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` zero-padded at the high end to a multiple of :data:`SIZE_DIVISOR`."""
    pad = []
    for n in reversed(x.shape[2:]):
        pad += [0, -n % SIZE_DIVISOR]
    return F.pad(x, pad)


@torch.no_grad()
def _run(model: Detector, image: torch.Tensor, proposals: torch.Tensor | None) -> tuple[dict, dict]:
    """One normalised ``[C, H, W]`` image through ``model`` (eval) -> (detections clipped to the image, raw output)."""
    x = _pad(image[None].to(next(model.parameters()).device))
    out = model(x, proposals=None if proposals is None else [proposals])
    det = out["detections"][0]
    det = {**det, "boxes": clip_boxes(det["boxes"], image.shape[1:])}
    return {k: v.cpu() for k, v in det.items()}, out


def evaluate_step(model: Detector, data: StepDataset) -> dict[str, float]:
    """Validation metrics for the trainer: ``val_map50`` (VOC all-point) and ``val_map50_07`` (11-point)."""
    was = model.training
    model.eval()
    preds, gts = [], []
    for i in range(len(data)):
        s = data[i]
        det, _ = _run(model, s["image"], s.get("proposals"))
        preds.append(det)
        gts.append({"boxes": s["boxes"], "labels": s["labels"]})
    model.train(was)
    k = len(data.classes)
    return {"val_map50": float(evaluate_voc(preds, gts, num_classes=k)["map"]),
            "val_map50_07": float(evaluate_voc(preds, gts, num_classes=k, use_07_metric=True)["map"])}


def train_detector_step(step: str, train: LineageSet, val: LineageSet, cfg: DetectorStepConfig, out_dir: str | Path,
                        *, resume: bool = False, device: str = "cpu", progress: bool = True,
                        proposals: ProposalConfig | None = None, cache_dir: str | Path | None = None) -> dict:
    """Train ``step`` (one of :data:`STEPS`) on ``train`` (best epoch by mAP@0.5 on ``val``); writes
    ``out_dir/<step>.safetensors`` and ``out_dir/<step>.json``. Fast R-CNN's selective-search proposals (settings
    ``proposals``, default :class:`ProposalConfig`) are read from / cached in ``cache_dir`` (default
    ``out_dir/cache/ss``, shared with R-CNN). ``resume`` continues ``out_dir/runs/<step>``; without it that folder must
    not hold a run. Returns ``{"weights", "record", "train_seconds", "best_epoch", "val_map50"}``."""
    _check_step(step)
    cfg.validate()
    if list(train.class_names) != list(val.class_names):
        raise ValueError(f"train and val have different classes: {train.class_names} vs {val.class_names}")
    out_dir = Path(out_dir)
    model_cfg = cfg.step_model(step, train.class_names)
    model_cfg.validate()
    prop_cfg = proposals or ProposalConfig()
    prop_cfg.validate()
    train_props = val_props = None
    if step == "fast_rcnn":
        cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache" / "ss"
        train_props = proposals_for(train, prop_cfg, cache, progress=progress)
        val_props = proposals_for(val, prop_cfg, cache, progress=progress)
    run_dir = out_dir / "runs" / step
    run_config = {"step": step, "model": model_cfg.to_dict(), "detectors": cfg.to_dict(),
                  "proposals": prop_cfg.to_dict() if step == "fast_rcnn" else None,
                  "data": {"train": train.spec, "val": val.spec, "scale": train.scale}}
    prepare_run_dir(run_dir, run_config, resume=resume)
    seed_everything(cfg.train.seed)  # the initial weights are part of the run
    model = build_detector(model_cfg)
    trainer = Trainer(model=model, train_data=StepDataset(train, train_props, cfg.augmentation()),
                      val_data=StepDataset(val, val_props), config=cfg.train, run_dir=run_dir,
                      evaluate=evaluate_step, run_config=run_config, device=device, progress=progress)
    resumed = bool(resume and trainer.resume())
    t0 = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - t0
    model = trainer.model.cpu()
    best = read_best(run_dir)
    if best is not None:
        load_state(model, Path(best["weights"]))
    epoch = int(best["epoch"]) if best is not None else trainer.epoch
    val_map = float(best["value"]) if best is not None else None
    extra = {"lineage_step": step, "name": NAMES[step], "epoch": epoch, "val_map50": val_map, "train_data": train.spec,
             "val_data": val.spec}
    if step == "fast_rcnn":
        extra["proposals"] = prop_cfg.to_dict()
    # a Fast R-CNN needs proposals from outside (the lineage's own evaluation); the other steps are plain detectors
    weights = save_model(model, out_dir / f"{step}.safetensors", kind="detector",
                         preprocess=dataclasses.replace(PREPROCESS, scale=float(train.scale)),
                         classes=list(train.class_names), task="lineage" if step == "fast_rcnn" else "detection",
                         extra=extra)
    record = {"step": step, "name": NAMES[step], "weights": str(weights), "train_seconds": seconds,
              "resumed": resumed, "best_epoch": epoch, "val_map50": val_map, "config": run_config,
              "data": {"train": train.spec, "val": val.spec, "scale": train.scale, "train_images": len(train),
                       "val_images": len(val)},
              "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
              "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "history": history}
    text = json.dumps(record, indent=1, default=str)
    path = write_atomically(out_dir / f"{step}.json", lambda tmp: tmp.write_text(text))
    return {"weights": str(weights), "record": str(path), "train_seconds": seconds, "best_epoch": epoch,
            "val_map50": val_map}


@dataclass
class DetectorMethod:
    """A trained lineage detector: ``detect(image)`` on one raw ``[3, H, W]`` image (0..255, the lineage's scale)."""

    name: str
    model: Detector
    proposals: ProposalConfig | None = None  # Fast R-CNN: the selective search run on each image

    def detect(self, image: torch.Tensor) -> dict:
        prop, seconds = None, 0.0
        if self.proposals is not None:
            t0 = time.perf_counter()
            prop = propose(image, self.proposals)
            seconds = time.perf_counter() - t0
        det, out = _run(self.model, normalise(image), prop)
        if prop is not None:
            n = prop.shape[0]
        elif "proposals" in out:  # Faster R-CNN: the RPN's proposals
            n = out["proposals"][0].shape[0]
        else:  # one-stage: the boxes the dense head scores
            n = _dense_boxes(self.model, _pad(image[None]).shape[2:])
        return {**det, "num_proposals": int(n), "proposal_seconds": float(seconds)}


def _dense_boxes(model: Detector, shape: Sequence[int]) -> int:
    """Boxes a one-stage head scores on an input of ``shape``: YOLO's cells x B, RetinaNet's anchors."""
    heads = model.heads
    if hasattr(heads, "num_boxes"):
        return heads.num_boxes(shape)
    gen = heads.anchor_generator
    return sum(math.prod(math.ceil(int(n) / s) for n, s in zip(shape, st)) * a
               for st, a in zip(gen.strides, gen.num_anchors_per_location))


def load_detector_step(path: str | Path, *, proposals: ProposalConfig | None = None,
                       device: str = "cpu") -> DetectorMethod:
    """A lineage detector file -> :class:`DetectorMethod` named after its arch. Fast R-CNN runs selective search with
    ``proposals`` (default: the settings it was trained with, stored in the file)."""
    loaded = load_model(path, device=device)
    arch = getattr(loaded.model.config, "arch", None) if loaded.kind == "detector" else None
    if arch not in STEPS:
        raise ValueError(f"{path}: not a lineage detector (kind {loaded.kind!r}, arch {arch!r})")
    pre = loaded.preprocess
    if (pre.max_value, pre.mean, pre.std, pre.window) != (MAX_VALUE, [MEAN], [STD], None):
        raise ValueError(f"{path}: the lineage normalises (x / {MAX_VALUE:g} - {MEAN}) / {STD}; this model expects "
                         f"max_value {pre.max_value}, mean {pre.mean}, std {pre.std}, window {pre.window}")
    prop = None
    if arch == "fast_rcnn":
        stored = loaded.meta.get("extra", {}).get("proposals")
        prop = proposals or (ProposalConfig(**stored) if stored else ProposalConfig())
        prop.validate()
    return DetectorMethod(name=NAMES[arch], model=loaded.model, proposals=prop)
