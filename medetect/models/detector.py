"""The composition root: image -> backbone -> FPN -> (RPN -> RoI heads | one-stage head) -> detections + losses.

``Detector(images, targets=None)`` returns ``{"detections": [...], "losses": {...}}``: detections always in eval
mode, losses whenever targets are given (also in eval mode, so a validation loss needs no mode switching; in train
mode detections are skipped unless ``with_detections=True``). Targets per image: ``{"boxes": [G, 2d] float,
"labels": [G] long in 0..K-1}``. Detections per image: ``{"boxes": [D, 2d], "scores": [D], "labels": [D]}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from ..anchors import AnchorGenerator
from ..backbones.resnet import ResNet
from ..backbones.vgg import VGG16
from ..layers.fpn import FPN
from ..layers.nd import NORM_KINDS
from ..schema import check, option
from .retinanet import RetinaHead, RetinaNetHead
from .roi_heads import FastRCNNPredictor, MultiLevelRoIAlign, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead

__all__ = ["Detector", "DetectorConfig", "build_detector", "BACKBONES", "ARCHITECTURES"]

BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg16")
ARCHITECTURES = ("faster_rcnn", "retinanet")


@dataclass
class DetectorConfig:
    arch: str = option("faster_rcnn", doc="detector: two-stage Faster R-CNN or one-stage RetinaNet (focal loss)",
                       choices=ARCHITECTURES)
    ndim: int = option(2, doc="spatial dims: 2 for images, 3 for volumes", choices=(1, 2, 3))
    in_channels: int = option(3, doc="image channels (1 for CT / mammograms, 3 for RGB microscopy)", ge=1)
    num_classes: int = option(1, doc="object classes, background excluded", ge=1)
    class_names: list[str] = option([], doc="names of labels 0..K-1 (optional; carried into reports)")
    backbone: str = option("resnet18", doc="feature extractor", choices=BACKBONES)
    base_width: int = option(64, doc="channels of the first stage (64 = the papers; smaller for CPU training)", ge=1)
    norm: str = option("group", doc="normalisation layer; GroupNorm trains from scratch with small batches",
                       choices=NORM_KINDS)
    stem_stride: list[int] | int = option(2, doc="first conv stride; a list gives one per axis for anisotropic "
                                          "volumes, e.g. [1, 2, 2]", ge=1)
    fpn_channels: int = option(256, doc="channels of every pyramid level", ge=1)
    levels: list[int] = option([2, 3, 4, 5], doc="backbone stages feeding the FPN (c2..c5)", ge=2, le=5)
    anchor_sizes: list[list[float]] = option([[32], [64], [128], [256]], doc="anchor sizes (voxels) per pyramid "
                                             "level", gt=0)
    aspect_ratios: list[float] = option([0.5, 1.0, 2.0], doc="anchor aspect ratios h / w (2D only)", gt=0)
    anchor_shapes: list[list[list[float]]] | None = option(
        None, doc="explicit anchor shapes per level (3D: [[d, h, w], ...]); overrides anchor_sizes / aspect_ratios",
        gt=0)
    # RPN (Ren et al. 2015)
    rpn_pre_nms_top_n: list[int] = option([2000, 1000], doc="RPN proposals kept per level before NMS: [train, test]",
                                          ge=1)
    rpn_post_nms_top_n: list[int] = option([2000, 1000], doc="RPN proposals kept per image after NMS: [train, test]",
                                           ge=1)
    rpn_nms_thresh: float = option(0.7, doc="IoU above which the RPN suppresses a proposal", ge=0, le=1)
    rpn_batch_size_per_image: int = option(256, doc="anchors sampled per image for the RPN loss (paper: 256)", ge=1)
    rpn_objectness_loss: str = option("bce", doc="RPN objectness loss: sampled BCE (paper) or focal over all "
                                      "anchors (3D RPN, Xu et al. 2019)", choices=("bce", "focal"))
    rpn_negative_sampling: str = option("random", doc="with bce: random negatives (paper) or the highest-loss "
                                        "negatives (hard negative mining)", choices=("random", "hard"))
    # RoI heads (Fast R-CNN)
    roi_output_size: int = option(7, doc="RoIAlign output size per axis", ge=1)
    roi_hidden: int = option(1024, doc="width of the two fully connected layers of the box head", ge=1)
    roi_batch_size_per_image: int = option(512, doc="proposals sampled per image for the box head loss", ge=1)
    # inference
    score_thresh: float = option(0.05, doc="detections below this score are dropped", ge=0, le=1)
    nms_thresh: float = option(0.5, doc="IoU above which a detection of the same class is suppressed", ge=0, le=1)
    detections_per_img: int = option(100, doc="detections kept per image after NMS", ge=1)

    def require_ct(self, prefix: str = "model") -> None:
        """A CT pipeline's check: a 3D, single-channel detector (``ValueError`` naming the keys otherwise)."""
        if self.ndim != 3 or self.in_channels != 1:
            raise ValueError(f"{prefix}.ndim must be 3 and {prefix}.in_channels 1 for CT volumes, got ndim {self.ndim} "
                             f"and in_channels {self.in_channels}")

    def validate(self, prefix: str = "model") -> None:
        """Check ranges, choices and cross-field rules that need no building (called when a config is loaded,
        before any data is read, and again by :func:`build_detector`)."""
        check(self, prefix)
        for key in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            if len(getattr(self, key)) != 2:
                raise ValueError(f"{prefix}.{key} must be [train, test] (2 numbers), got {getattr(self, key)}")
        if isinstance(self.stem_stride, (list, tuple)) and len(self.stem_stride) != self.ndim:
            raise ValueError(f"{prefix}.stem_stride must be one number or {self.ndim} (one per axis), "
                             f"got {self.stem_stride}")
        if not self.levels:
            raise ValueError(f"{prefix}.levels must name at least one backbone stage, got []")
        key, per_level = ("anchor_shapes", self.anchor_shapes) if self.anchor_shapes is not None else \
            ("anchor_sizes", self.anchor_sizes)
        if len(per_level) != len(self.levels):
            raise ValueError(f"{prefix}.{key} must have one entry per level of {prefix}.levels {self.levels}, "
                             f"got {len(per_level)}")
        if self.anchor_shapes is not None:
            for i, lvl in enumerate(self.anchor_shapes):
                for j, s in enumerate(lvl):
                    if len(s) != self.ndim:
                        raise ValueError(f"{prefix}.anchor_shapes[{i}][{j}] must have {self.ndim} sizes (one per "
                                         f"axis), got {s}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{prefix}.class_names must name all {prefix}.num_classes = {self.num_classes} classes, "
                             f"got {len(self.class_names)}")

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
