"""Lineage steps 1 and 2: classification + localisation on one-object crops, and OverFeat, the same network made
fully convolutional and slid over whole images at several scales.

* :func:`train_localizer` trains a :class:`~medetect.models.localizer.Localizer` on crops of
  :func:`~medetect.lineage.crops.object_crops` (new crops every epoch: new context, jitter and background windows;
  random flips; classes re-weighted by ``class_balance``) with the generic
  :class:`~medetect.engine.trainer.Trainer` (run folder ``out_dir/runs/localizer``, exact resume), and writes
  ``out_dir/localizer.safetensors`` (kind ``localizer``) and the train record ``out_dir/localizer.json``.
* :func:`evaluate_localizer` scores a model file on the fixed crops of a split: accuracy over object and background
  crops, and mean IoU of the true class's box on object crops.
* :func:`load_overfeat` gives the ``OverFeat`` row's detector (see :class:`OverFeat` for the exact procedure,
  including the box merging rule).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..boxes import batched_nms, box_iou, clip_boxes, elementwise_box_iou
from ..files import write_text_atomically
from ..engine.trainer import TrainConfig, Trainer, json_safe
from ..models.io import Preprocess, load_model, save_model
from ..models.localizer import BOX_LOSSES, LOCALIZER_BACKBONES, Localizer, LocalizerConfig
from ..layers.nd import NORM_KINDS
from ..schema import check, option
from .crops import object_crops
from .data import MAX_VALUE, MEAN, STD, LineageSet, normalise

__all__ = ["LocalizerStepConfig", "OverFeatConfig", "OverFeat", "train_localizer", "evaluate_localizer",
           "load_overfeat", "crop_metrics", "merge_boxes", "VAL_SEED"]

VAL_SEED = 20140101  # the fixed crops every evaluation uses (OverFeat appeared at ICLR 2014)
STEP = "localizer"


@dataclass
class LocalizerStepConfig:
    # model (medetect.models.localizer.LocalizerConfig)
    backbone: str = option("resnet18", doc="trunk", choices=LOCALIZER_BACKBONES)
    base_width: int = option(32, doc="channels of the trunk's first stage", ge=1)
    norm: str = option("batch", doc="trunk normalisation (batch: local in eval mode, so OverFeat's slide over a "
                       "whole image is the window net; group is not)", choices=NORM_KINDS)
    stage: int = option(4, doc="backbone stage feeding the head (ResNet c4 = stride 16)", ge=2, le=5)
    window: int = option(64, doc="crop side in pixels (stride 16: 4 x 4 trunk features)", ge=8)
    hidden: int = option(256, doc="width of fc6 and fc7", ge=1)
    dropout: float = option(0.0, doc="dropout after fc6 and fc7", ge=0, lt=1)
    box_loss: str = option("smooth_l1", doc="box loss: smooth_l1 or l2 (OverFeat's)", choices=BOX_LOSSES)
    class_agnostic: bool = option(False, doc="one box for all classes instead of one per class")
    box_weight: float = option(1.0, doc="weight of the box loss", ge=0)
    # crops (medetect.lineage.crops.object_crops)
    context: list[float] = option([1.3, 2.0], doc="window side / the object's longest side, drawn uniformly in "
                                  "[low, high]", gt=0)
    jitter: float = option(0.15, doc="window centre moved by up to this fraction of its side per axis", ge=0)
    negatives_per_image: int = option(8, doc="background windows per image and epoch", ge=0)
    class_balance: float = option(0.5, doc="crops of a class (background included) are drawn with weight "
                                  "frequency^-class_balance: 0 keeps the data's mix, 1 makes classes equal", ge=0,
                                  le=1)
    crops_per_epoch: int = option(4000, doc="crops drawn (with replacement) from each epoch's crops", ge=1)
    flips: bool = option(True, doc="random flips along every axis (boxes flipped with the crops)")
    # training (medetect.engine.trainer.TrainConfig)
    epochs: int = option(6, doc="epochs (each: crops_per_epoch crops)", ge=1)
    batch_size: int = option(64, doc="crops per step", ge=1)
    optimizer: str = option("adamw", doc="sgd or adamw", choices=("sgd", "adamw"))
    lr: float = option(1e-3, doc="peak learning rate (cosine schedule after warm-up)", gt=0)
    weight_decay: float = option(1e-4, doc="weight decay", ge=0)
    warmup_iters: int = option(100, doc="linear warm-up steps", ge=0)
    seed: int = option(0, doc="seed of weights, crops and data order", ge=0)
    val_every: int = option(0, doc="epochs between validations on the val crops (0: only the final one)", ge=0)

    def validate(self, prefix: str = "localizer") -> None:
        check(self, prefix)
        if len(self.context) != 2 or self.context[0] > self.context[1]:
            raise ValueError(f"{prefix}.context must be [low, high] with low <= high, got {self.context}")
        self.model_config(3, 1).validate(prefix)

    def to_dict(self) -> dict:
        return asdict(self)

    def model_config(self, in_channels: int, num_classes: int) -> LocalizerConfig:
        return LocalizerConfig(ndim=2, in_channels=in_channels, num_classes=num_classes, backbone=self.backbone,
                               base_width=self.base_width, norm=self.norm, stage=self.stage, window=self.window,
                               hidden=self.hidden, dropout=self.dropout, box_loss=self.box_loss,
                               class_agnostic=self.class_agnostic, box_weight=self.box_weight)


# ------------------------------------------------------------------------------------------------ crops as data


def _stack_targets(targets: list[dict], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop targets -> labels ``[N]`` (-1 = background) and boxes ``[N, 2d]`` (zeros for background)."""
    none_l, none_b = torch.full((1,), -1, dtype=torch.long), torch.zeros(1, 2 * d)
    labels = torch.cat([none_l] + [t["labels"].reshape(-1)[:1].long() if t["labels"].numel() else none_l
                                   for t in targets])[1:]
    boxes = torch.cat([none_b] + [t["boxes"].reshape(-1, 2 * d)[:1].float() if t["boxes"].numel() else none_b
                                  for t in targets])[1:]
    return labels, boxes


class _CropSet(torch.utils.data.Dataset):
    """Normalised crops, labels (-1 = background) and boxes; with ``data``, ``set_epoch(e)`` cuts a new set."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, *,
                 data: LineageSet | None = None, cfg: LocalizerStepConfig | None = None):
        self.images, self.labels, self.boxes, self.data, self.cfg = images, labels, boxes, data, cfg

    @classmethod
    def fixed(cls, data: LineageSet, cfg: LocalizerStepConfig, seed: int = VAL_SEED) -> "_CropSet":
        crops, targets = object_crops(data, window=cfg.window, context=tuple(cfg.context), jitter=cfg.jitter,
                                      negatives_per_image=cfg.negatives_per_image, seed=seed)
        labels, boxes = _stack_targets(targets, crops.dim() - 2)
        return cls(normalise(crops), labels, boxes)

    def set_epoch(self, epoch: int) -> None:
        if self.data is None:
            return
        cfg = self.cfg
        seed = cfg.seed * 100003 + epoch
        crops, targets = object_crops(self.data, window=cfg.window, context=tuple(cfg.context), jitter=cfg.jitter,
                                      negatives_per_image=cfg.negatives_per_image, seed=seed)
        d = crops.dim() - 2
        labels, boxes = _stack_targets(targets, d)
        g = torch.Generator().manual_seed(seed)
        counts = torch.bincount(labels + 1).float()  # [K + 1], background first
        w = counts.clamp(min=1).pow(-cfg.class_balance)[labels + 1]
        pick = torch.multinomial(w, cfg.crops_per_epoch, replacement=True, generator=g)
        crops, labels, boxes = crops[pick], labels[pick], boxes[pick]
        if cfg.flips:
            w_ = float(cfg.window)
            for a in range(d):  # flip axis a of a random half: image and box (lo, hi) -> (w - hi, w - lo)
                f = torch.rand(len(pick), generator=g) < 0.5
                crops[f] = crops[f].flip(2 + a)
                lo, hi = boxes[f, a].clone(), boxes[f, d + a].clone()
                boxes[f, a], boxes[f, d + a] = w_ - hi, w_ - lo
        self.images, self.labels, self.boxes = normalise(crops), labels, boxes

    def __len__(self) -> int:
        return len(self.images) if self.data is None else self.cfg.crops_per_epoch

    def __getitem__(self, i: int) -> dict:
        lab = self.labels[i]
        obj = bool(lab >= 0)
        return {"image": self.images[i], "boxes": self.boxes[i: i + 1] if obj else self.boxes[:0],
                "labels": self.labels[i: i + 1] if obj else self.labels[:0]}


def _collate(samples: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    return torch.stack([s["image"] for s in samples]), [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]


@torch.no_grad()
def crop_metrics(model: Localizer, crops: _CropSet, batch_size: int = 256) -> dict[str, float]:
    """Accuracy over all crops (K + 1 classes), on object and on background crops, and mean IoU of the true class's
    predicted box with the target on object crops (window pixels)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    preds, ious = [], []
    for s in range(0, len(crops.images), batch_size):
        out = model(crops.images[s: s + batch_size].to(dev))
        lab = crops.labels[s: s + batch_size].to(dev)
        preds.append(out["logits"].argmax(1) - 1)
        box = out["boxes"][torch.arange(len(lab), device=dev), lab.clamp(min=0)]  # [b, 2d]
        ious.append(torch.where(lab >= 0, elementwise_box_iou(box, crops.boxes[s: s + batch_size].to(dev)),
                                torch.full_like(box[:, 0], float("nan"))))
    model.train(was)
    pred, iou, lab = torch.cat(preds).cpu(), torch.cat(ious).cpu(), crops.labels
    obj = lab >= 0
    ok = (pred == lab).float()
    return {"accuracy": float(ok.mean()), "object_accuracy": float(ok[obj].mean()) if obj.any() else float("nan"),
            "background_accuracy": float(ok[~obj].mean()) if (~obj).any() else float("nan"),
            "mean_iou": float(iou[obj].mean()) if obj.any() else float("nan"),
            "num_object_crops": int(obj.sum()), "num_background_crops": int((~obj).sum())}


# ------------------------------------------------------------------------------------------------ training


def _preprocess(data: LineageSet) -> Preprocess:
    c = data.images[0].shape[0] if len(data) else 3
    return Preprocess(ndim=2, channels=c, max_value=MAX_VALUE, mean=[MEAN], std=[STD], scale=data.scale,
                      bit_depth=8, value_range=[0.0, MAX_VALUE])


def train_localizer(train: LineageSet, val: LineageSet | None, cfg: LocalizerStepConfig, out_dir, *,
                    resume: bool = False, device="cpu", progress: bool = True) -> dict:
    """Train the localizer (module docstring); returns the train record (also written to ``localizer.json``)."""
    cfg.validate()
    if len(train) == 0 or train.num_objects == 0:
        raise ValueError(f"{train.spec or 'the training split'} has no annotated object to crop")
    out = Path(out_dir)
    run_dir = out / "runs" / STEP
    c, k = train.images[0].shape[0], len(train.class_names)
    torch.manual_seed(cfg.seed)
    model = Localizer(cfg.model_config(c, k))
    dataset = _CropSet(torch.zeros(0), torch.zeros(0), torch.zeros(0), data=train, cfg=cfg)
    val_set = _CropSet.fixed(val, cfg) if val is not None and len(val) else None
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, warmup_iters=cfg.warmup_iters, seed=cfg.seed, num_workers=0,
                       val_every=cfg.val_every, amp="off", log_every=10)

    def evaluate(m, vs):
        return {f"val_{k_}": v for k_, v in crop_metrics(m, vs).items() if not k_.startswith("num_")}

    trainer = Trainer(model=model, train_data=dataset, config=tcfg, run_dir=run_dir, val_data=val_set,
                      evaluate=evaluate if val_set is not None else None, collate=_collate,
                      run_config={"localizer": cfg.to_dict()}, device=device, progress=progress,
                      best_metric=None)
    resumed = trainer.resume() if resume else False
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    model = trainer.model
    val_metrics = crop_metrics(model, val_set) if val_set is not None else {}
    weights = save_model(model, out / f"{STEP}.safetensors", kind="localizer", preprocess=_preprocess(train),
                         classes=train.class_names,
                         extra={"step": STEP, "window": cfg.window, "class_names": list(train.class_names),
                                "train": train.spec, "val": val.spec if val is not None else None,
                                "epochs": cfg.epochs, "val_crop_seed": VAL_SEED,
                                "crops": {"context": cfg.context, "jitter": cfg.jitter,
                                          "negatives_per_image": cfg.negatives_per_image}})
    record = {"step": STEP, "weights": str(weights), "train_seconds": seconds, "resumed": resumed,
              "config": cfg.to_dict(), "data": {"train": train.spec, "val": val.spec if val is not None else None,
                                                "scale": train.scale, "train_images": len(train),
                                                "train_objects": train.num_objects},
              "val": val_metrics, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "device": str(device),
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if resumed:
        record["notes"] = "resumed: train_seconds counts the last invocation only"
    write_text_atomically(out / f"{STEP}.json", json.dumps(json_safe(record), indent=1, allow_nan=False))
    return record


def evaluate_localizer(path, data: LineageSet, *, device="cpu") -> dict:
    """Accuracy and mean IoU (see :func:`crop_metrics`) of the model file ``path`` on the fixed crops of ``data``
    (seed :data:`VAL_SEED`, the crop settings stored with the model)."""
    lm = load_model(path, device=device)
    if lm.kind != "localizer":
        raise ValueError(f"{path}: a {lm.kind!r} model file, not a localizer")
    extra = lm.meta.get("extra", {})
    crops = extra.get("crops", {})
    step = LocalizerStepConfig(window=lm.model.config.window, context=list(crops.get("context", [1.3, 2.0])),
                               jitter=float(crops.get("jitter", 0.15)),
                               negatives_per_image=int(crops.get("negatives_per_image", 8)))
    if not len(data):
        raise ValueError(f"{data.spec or 'the split'} has no images")
    return crop_metrics(lm.model, _CropSet.fixed(data, step))


# ------------------------------------------------------------------------------------------------ OverFeat


@dataclass
class OverFeatConfig:
    scales: list[float] = option([0.4, 0.7, 1.0, 1.4, 2.0], doc="image scale factors; the net sees windows of "
                                 "`window` pixels of the image resized by each (BCCD at 0.5 with a 64 window: WBC "
                                 "~100 px fit at 0.4, RBC ~50 px at 0.7, platelets ~20 px at 2; picked lightly on "
                                 "30 val images)", gt=0, le=8)
    score_thresh: float = option(0.05, doc="class probability below which a window's class is dropped", ge=0, le=1)
    nms_thresh: float = option(0.3, doc="IoU above which a box of the same class is suppressed", ge=0, le=1)
    merge: bool = option(False, doc="OverFeat-style box merging: each box kept by NMS becomes the score-weighted "
                         "mean of all same-class boxes overlapping it by more than merge_iou")
    merge_iou: float = option(0.5, doc="IoU with a kept box above which a box joins its merge", ge=0, le=1)
    pre_nms_top_n: int = option(3000, doc="highest-scoring (window, class) pairs kept before NMS", ge=1)
    detections_per_img: int = option(100, doc="detections kept per image", ge=1)
    border: bool = option(True, doc="pad the (scaled) image with zeros by half a window (rounded to the stride) "
                          "so that objects at the border are seen centred, as in training")

    def validate(self, prefix: str = "overfeat") -> None:
        check(self, prefix)
        if not self.scales:
            raise ValueError(f"{prefix}.scales must name at least one scale")

    def to_dict(self) -> dict:
        return asdict(self)


def merge_boxes(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                iou: float) -> torch.Tensor:
    """OverFeat-style merging (box voting): kept box ``keep[j]`` becomes ``sum_i w_ij b_i / sum_i w_ij`` over ALL
    candidates ``i`` of its class with ``IoU(b_i, b_keep[j]) > iou`` (itself included), ``w_ij = scores[i]``. Its
    score is unchanged. (OverFeat's paper merges pairs by a centre-distance + IoU match score, repeatedly; this is
    its common one-pass, score-weighted form.) Vectorised: one ``[D, N]`` IoU matrix."""
    if len(keep) == 0:
        return boxes[keep]
    ov = box_iou(boxes[keep], boxes)  # [D, N]
    w = ((ov > iou) & (labels[keep][:, None] == labels[None])).float() * scores[None]  # [D, N]
    w[torch.arange(len(keep), device=w.device), keep] = scores[keep]  # a kept box always votes for itself
    return (w @ boxes) / w.sum(1, keepdim=True)


class OverFeat:
    """The ``OverFeat`` row: a :class:`~medetect.models.localizer.OverFeatNet` slid over the image at every scale.

    ``detect(image [C, H, W] raw)``: for each scale ``s`` the image is resized to ``round(s * H) x round(s * W)``
    (bilinear, antialiased), padded with raw zeros (half a window on each side, rounded down to the stride, and at
    the high end up to at least one window), normalised, and run through the net ONCE (all windows of that scale);
    softmax gives ``K + 1`` class maps; window ``i``'s box (its class's box) is moved by ``i * stride - pad`` and
    divided by the actual resize factor into image pixels, clipped to the image. All (window, class) pairs of all
    scales with probability >= ``score_thresh`` (the best ``pre_nms_top_n``) go to per-class NMS
    (:func:`~medetect.boxes.batched_nms`), optionally :func:`merge_boxes`, and the best ``detections_per_img``
    are returned. ``num_proposals`` = windows evaluated (sum of the score maps' sizes)."""

    name = "OverFeat"

    def __init__(self, model: Localizer, cfg: OverFeatConfig, class_names: list[str], device="cpu"):
        cfg.validate()
        self.cfg, self.class_names, self.device = cfg, list(class_names), torch.device(device)
        self.net = model.fully_convolutional().eval().to(self.device)
        self.window, self.stride = model.config.window, model.stride

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> dict:
        cfg, net = self.cfg, self.net
        d = image.dim() - 1
        img = image.to(self.device).float()[None]  # [1, C, *S]
        size = torch.tensor(image.shape[1:], dtype=torch.float32, device=self.device)
        all_boxes, all_scores, all_labels, windows = [], [], [], 0
        for s in cfg.scales:  # one forward per scale (shapes differ)
            shape = [max(1, round(float(n) * s)) for n in image.shape[1:]]
            x = F.interpolate(img, size=shape, mode=("linear", "bilinear", "trilinear")[d - 1], align_corners=False,
                              antialias=d == 2 and s < 1)
            pad = [(self.window // 2 // st) * st if cfg.border else 0 for st in self.stride]
            extra = [max(0, self.window - (n + 2 * p)) for n, p in zip(shape, pad)]
            x = F.pad(x, [v for a in reversed(range(d)) for v in (pad[a], pad[a] + extra[a])])  # raw zeros
            out = net(normalise(x))
            prob = out["logits"][0].softmax(0)[1:]  # [K, *M]
            k, m = prob.shape[0], prob.shape[1:]
            windows += math.prod(m)
            grid = torch.meshgrid(*[torch.arange(n, device=self.device, dtype=torch.float32) for n in m],
                                  indexing="ij")
            corner = torch.stack([g * st - p for g, st, p in zip(grid, self.stride, pad)])  # [d, *M] scaled pixels
            factor = torch.tensor(shape, dtype=torch.float32, device=self.device) / size  # [d]
            boxes = out["boxes"][0] + corner.repeat(2, *(1,) * d)[None]  # [K, 2d, *M]
            boxes = boxes / factor.repeat(2).reshape(1, 2 * d, *(1,) * d)
            all_boxes.append(boxes.flatten(2).permute(0, 2, 1).reshape(-1, 2 * d))  # [K * M, 2d]
            all_scores.append(prob.reshape(-1))
            all_labels.append(torch.arange(k, device=self.device).repeat_interleave(prob[0].numel()))
        boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        sel = (scores >= cfg.score_thresh).nonzero().flatten()
        sel = sel[scores[sel].topk(min(cfg.pre_nms_top_n, len(sel))).indices]
        boxes, scores, labels = clip_boxes(boxes[sel], image.shape[1:]), scores[sel], labels[sel]
        ok = ((boxes[:, d:] - boxes[:, :d]) > 0).all(1).nonzero().flatten()  # boxes clipped to nothing
        boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        kept = merge_boxes(boxes, scores, labels, keep, cfg.merge_iou) if cfg.merge else boxes[keep]
        return {"boxes": kept.cpu(), "scores": scores[keep].cpu(), "labels": labels[keep].cpu(),
                "num_proposals": windows, "proposal_seconds": 0.0}


def load_overfeat(path, cfg: OverFeatConfig | None = None, device="cpu") -> OverFeat:
    """The ``OverFeat`` method of the localizer file ``path``."""
    lm = load_model(path, device=device)
    if lm.kind != "localizer":
        raise ValueError(f"{path}: a {lm.kind!r} model file, not a localizer")
    return OverFeat(lm.model, cfg or OverFeatConfig(), lm.classes, device=device)
