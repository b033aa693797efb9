"""The composition root: image -> backbone -> FPN -> (RPN -> RoI heads | one-stage head) -> detections + losses.

``Detector(images, targets=None)`` returns ``{"detections": [...], "losses": {...}}``: detections always in eval
mode, losses whenever targets are given (also in eval mode, so a validation loss needs no mode switching; in train
mode detections are skipped unless ``with_detections=True``). Targets per image: ``{"boxes": [G, 2d] float,
"labels": [G] long in 0..K-1}``. Detections per image: ``{"boxes": [D, 2d], "scores": [D], "labels": [D]}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..anchors import AnchorGenerator
from ..backbones.resnet import ResNet
from ..backbones.vgg import VGG16
from ..layers.fpn import FPN
from ..layers.nd import NORM_KINDS
from .retinanet import RetinaHead, RetinaNetHead
from .roi_heads import FastRCNNPredictor, MultiLevelRoIAlign, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead

__all__ = ["Detector", "DetectorConfig", "build_detector", "BACKBONES", "ARCHITECTURES"]

BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg16")
ARCHITECTURES = ("faster_rcnn", "retinanet")


@dataclass
class DetectorConfig:
    arch: str = "faster_rcnn"  # "faster_rcnn" (two-stage) or "retinanet" (one-stage, focal loss)
    ndim: int = 2  # spatial dims: 2 for images, 3 for volumes
    in_channels: int = 3  # image channels (1 for CT/mammograms, 3 for RGB microscopy)
    num_classes: int = 1  # object classes, background excluded
    class_names: list[str] = field(default_factory=list)  # names of labels 0..K-1 (optional, carried into reports)
    backbone: str = "resnet18"  # one of BACKBONES
    base_width: int = 64  # channels of the first stage (64 = the papers; smaller for CPU training)
    norm: str = "group"  # "group" | "batch" | "none": GroupNorm trains from scratch with small batches
    stem_stride: list[int] | int = 2  # first conv stride; per axis for anisotropic volumes, e.g. [1, 2, 2]
    fpn_channels: int = 256  # channels of every pyramid level
    levels: list[int] = field(default_factory=lambda: [2, 3, 4, 5])  # backbone stages feeding the FPN (c2..c5)
    anchor_sizes: list[list[float]] = field(default_factory=lambda: [[32], [64], [128], [256]])  # per level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # 2D only: h / w
    anchor_shapes: list[list[list[float]]] | None = None  # explicit per-level shapes (3D), overrides sizes/ratios
    # RPN (Ren et al. 2015)
    rpn_pre_nms_top_n: list[int] = field(default_factory=lambda: [2000, 1000])  # per level: train, test
    rpn_post_nms_top_n: list[int] = field(default_factory=lambda: [2000, 1000])  # per image: train, test
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_objectness_loss: str = "bce"  # "bce" (paper) or "focal" (3D RPN, Xu et al. 2019)
    rpn_negative_sampling: str = "random"  # "random" (paper) or "hard" (highest-loss negatives), with "bce"
    # RoI heads (Fast R-CNN)
    roi_output_size: int = 7
    roi_hidden: int = 1024
    roi_batch_size_per_image: int = 512
    # inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def validate(self) -> None:
        """Check the choices that need no building (called when a config is loaded, before any data is read)."""
        cfg = self
        if cfg.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch must be one of {ARCHITECTURES}, got {cfg.arch!r}")
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {cfg.backbone!r}")
        if cfg.ndim not in (1, 2, 3):
            raise ValueError(f"model.ndim must be 1, 2 or 3, got {cfg.ndim}")
        if cfg.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
        if cfg.norm not in NORM_KINDS:
            raise ValueError(f"model.norm must be one of {NORM_KINDS}, got {cfg.norm!r}")
        if cfg.rpn_objectness_loss not in ("bce", "focal"):
            raise ValueError(f"model.rpn_objectness_loss must be 'bce' or 'focal', got {cfg.rpn_objectness_loss!r}")
        if cfg.rpn_negative_sampling not in ("random", "hard"):
            raise ValueError(f"model.rpn_negative_sampling must be 'random' or 'hard', got {cfg.rpn_negative_sampling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class BackboneFPN(nn.Module):
    def __init__(self, *, body: nn.Module, fpn: FPN, levels: Sequence[int]):
        super().__init__()
        self.body, self.fpn, self.levels = body, fpn, list(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c = self.body(x, up_to=max(self.levels))  # stages beyond the deepest level used are skipped
        return self.fpn([c[f"c{i}"] for i in self.levels])


class Detector(nn.Module):
    def __init__(self, *, features: BackboneFPN, rpn: RegionProposalNetwork | None, heads: nn.Module, config: DetectorConfig):
        super().__init__()
        self.features, self.rpn, self.heads, self.config = features, rpn, heads, config

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None, with_detections: bool | None = None) -> dict:
        cfg = self.config
        if images.ndim != cfg.ndim + 2 or images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"images must have shape [B, {cfg.in_channels}, {', '.join('S' + str(i + 1) for i in range(cfg.ndim))}] "
                f"for this {cfg.ndim}D model with in_channels={cfg.in_channels}, got {tuple(images.shape)}"
            )
        if targets is not None and len(targets) != images.shape[0]:
            raise ValueError(f"targets must have one dict per image ({images.shape[0]}), got {len(targets)}")
        if with_detections is None:
            with_detections = not self.training
        shape = images.shape[2:]
        feats = self.features(images)
        losses: dict[str, torch.Tensor] = {}
        if self.rpn is not None:
            proposals, rpn_losses = self.rpn(feats, shape, targets)
            dets, head_losses = self.heads(feats, proposals, shape, targets, with_detections=with_detections)
            losses.update(rpn_losses)
        else:
            dets, head_losses = self.heads(feats, shape, targets, with_detections=with_detections)
        losses.update(head_losses)
        return {"detections": dets, "losses": losses}


def _anchor_generator(cfg: DetectorConfig, strides: Sequence[int]) -> AnchorGenerator:
    per_level = cfg.anchor_shapes if cfg.anchor_shapes is not None else cfg.anchor_sizes
    if len(per_level) != len(strides):
        raise ValueError(f"model.anchor_sizes/anchor_shapes need one entry per pyramid level ({len(strides)} levels: {cfg.levels}), got {len(per_level)}")
    if cfg.anchor_shapes is not None:
        return AnchorGenerator(shapes=cfg.anchor_shapes, strides=list(strides))
    # 2D: sizes x aspect ratios (the RPN paper); other d: cubes of each size.
    ratios = cfg.aspect_ratios if cfg.ndim == 2 else None
    return AnchorGenerator.from_sizes(sizes=cfg.anchor_sizes, strides=list(strides), aspect_ratios=ratios, ndim=cfg.ndim)


def build_detector(cfg: DetectorConfig) -> Detector:
    """Build a detector from its config (the one place where parts are chosen)."""
    cfg.validate()
    d = cfg.ndim
    stem = cfg.stem_stride if isinstance(cfg.stem_stride, int) else tuple(cfg.stem_stride)
    if cfg.backbone == "vgg16":
        body = VGG16(ndim=d, in_channels=cfg.in_channels, base_width=cfg.base_width, norm_kind=cfg.norm)
        stage_channels = dict(zip((3, 4, 5), body.out_channels))
        stage_strides = dict(zip((3, 4, 5), body.strides))
    else:
        body = ResNet(depth=int(cfg.backbone[6:]), ndim=d, in_channels=cfg.in_channels, base_width=cfg.base_width, norm_kind=cfg.norm, stem_stride=stem)
        stage_channels = dict(zip((2, 3, 4, 5), body.out_channels))
        stage_strides = dict(zip((2, 3, 4, 5), body.strides))
    bad = [lv for lv in cfg.levels if lv not in stage_channels]
    if bad:
        raise ValueError(f"model.levels {cfg.levels} includes {bad}; {cfg.backbone} offers {sorted(stage_channels)}")
    fpn = FPN(in_channels=[stage_channels[i] for i in cfg.levels], out_channels=cfg.fpn_channels, ndim=d)
    features = BackboneFPN(body=body, fpn=fpn, levels=cfg.levels)
    strides = [stage_strides[i] for i in cfg.levels]
    anchors = _anchor_generator(cfg, strides)
    a = anchors.num_anchors_per_location[0]
    if any(n != a for n in anchors.num_anchors_per_location):
        raise ValueError("every pyramid level needs the same number of anchor shapes (the head is shared)")
    if cfg.arch == "retinanet":
        head = RetinaNetHead(
            anchor_generator=anchors,
            head=RetinaHead(in_channels=cfg.fpn_channels, num_anchors=a, num_classes=cfg.num_classes, ndim=d, norm_kind=cfg.norm),
            score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
        )
        return Detector(features=features, rpn=None, heads=head, config=cfg)
    rpn = RegionProposalNetwork(
        anchor_generator=anchors,
        head=RPNHead(in_channels=cfg.fpn_channels, num_anchors=a, ndim=d),
        pre_nms_top_n=tuple(cfg.rpn_pre_nms_top_n),
        post_nms_top_n=tuple(cfg.rpn_post_nms_top_n),
        nms_thresh=cfg.rpn_nms_thresh,
        batch_size_per_image=cfg.rpn_batch_size_per_image,
        objectness_loss=cfg.rpn_objectness_loss,
        negative_sampling=cfg.rpn_negative_sampling,
    )
    pooled = cfg.fpn_channels * cfg.roi_output_size**d
    heads = RoIHeads(
        roi_pool=MultiLevelRoIAlign(strides=strides, output_size=cfg.roi_output_size),
        box_head=TwoMLPHead(in_features=pooled, hidden=cfg.roi_hidden),
        predictor=FastRCNNPredictor(in_features=cfg.roi_hidden, num_classes=cfg.num_classes, ndim=d),
        num_classes=cfg.num_classes,
        ndim=d,
        batch_size_per_image=cfg.roi_batch_size_per_image,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )
    return Detector(features=features, rpn=rpn, heads=heads, config=cfg)
