"""The composition root: image -> backbone -> FPN -> (proposals -> RoI heads | one-stage head) -> detections + losses.

Architectures (``DetectorConfig.arch``): ``faster_rcnn`` (RPN proposals -> RoI heads), ``fast_rcnn`` (the same RoI
heads on proposals given from outside, e.g. selective search; no RPN), ``retinanet`` (one-stage, focal loss) and
``yolo`` (one-stage YOLO v1 grid, :mod:`medetect.models.yolo`).

``Detector(images, targets=None, with_detections=None, proposals=None)`` returns ``{"detections": [...],
"losses": {...}}`` (two-stage archs add ``"proposals"``, the boxes the RoI heads ran on): detections always in eval
mode, losses whenever targets are given (also in eval mode, so a validation loss needs no mode switching; in train
mode detections are skipped unless ``with_detections=True``). Targets per image: ``{"boxes": [G, 2d] float,
"labels": [G] long in 0..K-1}`` (``fast_rcnn`` may also take ``"proposals"`` there, so a generic trainer works).
Detections per image: ``{"boxes": [D, 2d], "scores": [D], "labels": [D]}``. ``proposals`` (``fast_rcnn`` only): one
``[N_i, 2d]`` tensor per image; the ground-truth boxes join them in training (inside the RoI heads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from ..anchors import AnchorGenerator
from ..backbones import BACKBONES, build_backbone
from ..backbones.pretrained import NAMED_WEIGHTS, check_pretrained_options, load_pretrained
from ..layers.fpn import FPN
from ..layers.nd import NORM_KINDS, freeze_batch_norm
from ..schema import check, option
from .retinanet import RetinaHead, RetinaNetHead
from .roi_heads import ROI_POOL_MODES, FastRCNNPredictor, MultiLevelRoIAlign, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .yolo import LAMBDA_COORD, LAMBDA_NOOBJ, YoloHead

__all__ = ["Detector", "DetectorConfig", "build_detector", "BACKBONES", "ARCHITECTURES"]

ARCHITECTURES = ("faster_rcnn", "fast_rcnn", "retinanet", "yolo")
TWO_STAGE = ("faster_rcnn", "fast_rcnn")  # RoI heads on proposals


@dataclass
class DetectorConfig:
    arch: str = option("faster_rcnn", doc="detector: two-stage Faster R-CNN (RPN proposals), Fast R-CNN (proposals "
                       "given with the images, e.g. selective search), one-stage RetinaNet (focal loss) or YOLO (v1 "
                       "grid)", choices=ARCHITECTURES)
    ndim: int = option(2, doc="spatial dims: 2 for images, 3 for volumes", choices=(1, 2, 3))
    in_channels: int = option(3, doc="image channels (1 for CT / mammograms, 3 for RGB microscopy)", ge=1)
    num_classes: int = option(1, doc="object classes, background excluded", ge=1)
    class_names: list[str] = option([], doc="names of labels 0..K-1 (optional; carried into reports)")
    backbone: str = option("resnet18", doc="feature extractor (efficientnet_lite0: MBConv blocks with ReLU6, "
                           "features at strides 4-32 like ResNet's)", choices=BACKBONES)
    backbone_weights: str = option("", doc="start the backbone from pretrained weights: a torchvision-format state "
                                   "dict (.pth/.pt, read as tensors only, or .safetensors) of resnet18/34/50 or "
                                   "vgg16 (norm none; vgg16_bn: norm batch), or " + ", ".join(NAMED_WEIGHTS) +
                                   " (the extra medetect[pretrained]); the classifier is skipped, 3D kernels are "
                                   "inflated from 2D (repeated along depth / depth), in_channels 1 sums the RGB "
                                   "kernels of the first conv; inputs should be normalised like the weights' "
                                   "training data (ImageNet: data.mean [0.485, 0.456, 0.406], data.std [0.229, "
                                   "0.224, 0.225]); empty: random start", path=True)
    freeze_bn: bool = option(False, doc="freeze the backbone's BatchNorm statistics and affine (as torchvision's "
                             "detection models do with small batches); only with backbone_weights and norm batch: "
                             "a random start always trains its normalisation")
    base_width: int = option(64, doc="channels of the first stage (64 = the papers; smaller for CPU training; "
                             "efficientnet_lite0 scales its published widths by base_width / 64)", ge=1)
    norm: str = option("group", doc="normalisation layer; GroupNorm trains from scratch with small batches; "
                       "pretrained ResNet / EfficientNet weights need batch", choices=NORM_KINDS)
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
    roi_output_size: int = option(7, doc="RoI pooling output size per axis", ge=1)
    roi_pool: str = option("align", doc="RoI pooling of the box head: RoIAlign (Mask R-CNN) or max (RoI max pooling, "
                           "the Fast R-CNN paper's)", choices=ROI_POOL_MODES)
    roi_hidden: int = option(1024, doc="width of the two fully connected layers of the box head", ge=1)
    roi_batch_size_per_image: int = option(512, doc="proposals sampled per image for the box head loss", ge=1)
    # YOLO v1 grid head (Redmon et al. 2016)
    yolo_stride: int = option(0, doc="stride of the pyramid level the YOLO grid sits on (the cell size, so S = input "
                              "size / stride); 0: the deepest level of model.levels", ge=0)
    yolo_boxes_per_cell: int = option(2, doc="boxes B each YOLO cell predicts (the paper: 2)", ge=1)
    yolo_lambda_coord: float = option(LAMBDA_COORD, doc="YOLO loss weight of the box coordinates (the paper: 5)", gt=0)
    yolo_lambda_noobj: float = option(LAMBDA_NOOBJ, doc="YOLO loss weight of the confidence of boxes without an "
                                      "object (the paper: 0.5)", ge=0)
    # inference
    score_thresh: float = option(0.05, doc="detections below this score are dropped", ge=0, le=1)
    nms_thresh: float = option(0.5, doc="IoU above which a detection of the same class is suppressed", ge=0, le=1)
    detections_per_img: int = option(100, doc="detections kept per image after NMS", ge=1)
    tta: str = option("none", doc="test-time augmentation at prediction (medetect predict / evaluate, validation): "
                      "flips = the image and its 2^d - 1 flips, detections mapped back and fused (a cluster's score "
                      "is the mean over views of its best score, its box the score-weighted mean)",
                      choices=("none", "flips"))

    def require_ct(self, prefix: str = "model") -> None:
        """A CT pipeline's check: a 3D, single-channel detector (``ValueError`` naming the keys otherwise)."""
        if self.ndim != 3 or self.in_channels != 1:
            raise ValueError(f"{prefix}.ndim must be 3 and {prefix}.in_channels 1 for CT volumes, got ndim {self.ndim} "
                             f"and in_channels {self.in_channels}")

    def validate(self, prefix: str = "model") -> None:
        """Check ranges, choices and cross-field rules that need no building (called when a config is loaded,
        before any data is read, and again by :func:`build_detector`)."""
        check(self, prefix)
        check_pretrained_options(backbone=self.backbone, norm=self.norm, weights=self.backbone_weights,
                                 freeze_bn=self.freeze_bn, prefix=prefix)
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

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None,
                with_detections: bool | None = None, proposals: list[torch.Tensor] | None = None) -> dict:
        cfg = self.config
        if images.ndim != cfg.ndim + 2 or images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"images must have shape [B, {cfg.in_channels}, {', '.join('S' + str(i + 1) for i in range(cfg.ndim))}] "
                f"for this {cfg.ndim}D model with in_channels={cfg.in_channels}, got {tuple(images.shape)}"
            )
        if targets is not None and len(targets) != images.shape[0]:
            raise ValueError(f"targets must have one dict per image ({images.shape[0]}), got {len(targets)}")
        if proposals is not None and cfg.arch != "fast_rcnn":
            raise ValueError(f"proposals are taken by arch fast_rcnn only; this model is {cfg.arch}")
        if with_detections is None:
            with_detections = not self.training
        shape = images.shape[2:]
        feats = self.features(images)
        losses: dict[str, torch.Tensor] = {}
        if cfg.arch not in TWO_STAGE:
            dets, head_losses = self.heads(feats, shape, targets, with_detections=with_detections)
            losses.update(head_losses)
            return {"detections": dets, "losses": losses}
        if self.rpn is not None:
            proposals, rpn_losses = self.rpn(feats, shape, targets)
            losses.update(rpn_losses)
        else:
            proposals = _given_proposals(proposals, targets, images)
        dets, head_losses = self.heads(feats, proposals, shape, targets, with_detections=with_detections)
        losses.update(head_losses)
        return {"detections": dets, "losses": losses, "proposals": proposals}


def _given_proposals(proposals, targets, images: torch.Tensor) -> list[torch.Tensor]:
    """Fast R-CNN's proposals: the ``proposals`` argument, else ``targets[i]["proposals"]``; checked, on the images'
    device as float ``[N_i, 2d]``."""
    n, d = images.shape[0], images.ndim - 2
    if proposals is None and targets is not None and all("proposals" in t for t in targets):
        proposals = [t["proposals"] for t in targets]
    if proposals is None:
        raise ValueError("arch fast_rcnn needs proposals: pass proposals=[one [N_i, 2d] tensor per image] (or "
                         "targets[i]['proposals'] in training)")
    if len(proposals) != n:
        raise ValueError(f"proposals must have one tensor per image ({n}), got {len(proposals)}")
    out = []
    for i, p in enumerate(proposals):  # loop over images
        p = torch.as_tensor(p)
        if p.numel() == 0:
            p = p.reshape(0, 2 * d)
        if p.ndim != 2 or p.shape[1] != 2 * d:
            raise ValueError(f"proposals[{i}] must have shape [N, {2 * d}], got {tuple(p.shape)}")
        out.append(p.to(device=images.device, dtype=torch.float32))
    return out


def _anchor_generator(cfg: DetectorConfig, strides: Sequence[int]) -> AnchorGenerator:
    per_level = cfg.anchor_shapes if cfg.anchor_shapes is not None else cfg.anchor_sizes
    if len(per_level) != len(strides):
        raise ValueError(f"model.anchor_sizes/anchor_shapes need one entry per pyramid level ({len(strides)} levels: {cfg.levels}), got {len(per_level)}")
    if cfg.anchor_shapes is not None:
        return AnchorGenerator(shapes=cfg.anchor_shapes, strides=list(strides))
    # 2D: sizes x aspect ratios (the RPN paper); other d: cubes of each size.
    ratios = cfg.aspect_ratios if cfg.ndim == 2 else None
    return AnchorGenerator.from_sizes(sizes=cfg.anchor_sizes, strides=list(strides), aspect_ratios=ratios, ndim=cfg.ndim)


def build_detector(cfg: DetectorConfig, *, pretrained: bool = True) -> Detector:
    """Build a detector from its config (the one place where parts are chosen). ``pretrained``: load
    ``backbone_weights`` (False when a model file's own weights follow, so the file need not be there)."""
    cfg.validate()
    d = cfg.ndim
    stem = cfg.stem_stride if isinstance(cfg.stem_stride, int) else tuple(cfg.stem_stride)
    body = build_backbone(cfg.backbone, ndim=d, in_channels=cfg.in_channels, base_width=cfg.base_width,
                          norm_kind=cfg.norm, stem_stride=stem)
    if pretrained and cfg.backbone_weights:
        load_pretrained(body, cfg.backbone, cfg.backbone_weights, key="model.backbone_weights")
    if cfg.freeze_bn:  # validate() allows it only with backbone_weights
        freeze_batch_norm(body)
    stage_channels = dict(zip(body.levels, body.out_channels))
    stage_strides = dict(zip(body.levels, body.strides))
    bad = [lv for lv in cfg.levels if lv not in stage_channels]
    if bad:
        raise ValueError(f"model.levels {cfg.levels} includes {bad}; {cfg.backbone} offers {sorted(stage_channels)}")
    fpn = FPN(in_channels=[stage_channels[i] for i in cfg.levels], out_channels=cfg.fpn_channels, ndim=d)
    features = BackboneFPN(body=body, fpn=fpn, levels=cfg.levels)
    strides = [stage_strides[i] for i in cfg.levels]
    if cfg.arch == "yolo":
        level = _yolo_level(cfg, strides)
        head = YoloHead(in_channels=cfg.fpn_channels, num_classes=cfg.num_classes, ndim=d, level=level,
                        stride=strides[level], boxes_per_cell=cfg.yolo_boxes_per_cell, norm_kind=cfg.norm,
                        lambda_coord=cfg.yolo_lambda_coord, lambda_noobj=cfg.yolo_lambda_noobj,
                        score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img)
        return Detector(features=features, rpn=None, heads=head, config=cfg)
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
    rpn = None
    if cfg.arch == "faster_rcnn":
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
        roi_pool=MultiLevelRoIAlign(strides=strides, output_size=cfg.roi_output_size, mode=cfg.roi_pool),
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


def _yolo_level(cfg: DetectorConfig, strides: Sequence[Sequence[int]]) -> int:
    """Index (into the pyramid levels) of the YOLO grid: ``yolo_stride`` (largest per-axis stride), 0 = the deepest."""
    if cfg.yolo_stride == 0:
        return len(strides) - 1
    have = [max(s) for s in strides]
    if cfg.yolo_stride not in have:
        raise ValueError(f"model.yolo_stride must be the stride of one of the levels {cfg.levels} ({have}) or 0, got "
                         f"{cfg.yolo_stride}")
    return have.index(cfg.yolo_stride)
