"""R-CNN (Girshick et al., CVPR 2014): every region proposal is cropped with some context, warped to a fixed size,
and run through the whole CNN on its own; one linear SVM per class scores its features and one ridge regressor per
class refines its box. Written for any d (the lineage uses 2D).

Shape key
    B  images          C  channels        d  spatial dims      W  warp_size (per axis)
    R  regions (warps) K  classes         F  fc7 width          P  pool5 width (trunk channels x pool_size^d)

Parts (the paper's names): ``trunk`` (ResNet here, AlexNet in the paper) -> ``pool5`` (its last stage pooled to
``pool_size`` per axis) -> ``fc6`` -> ``fc7`` (ReLU + dropout, as the paper) -> ``cls`` (K + 1 softmax, only for
fine-tuning). Buffers set after training (by :func:`medetect.lineage.rcnn.train_rcnn`): ``svm_weight [K, F]``,
``svm_bias [K]`` (linear SVMs on fc7; the feature scaling is folded in), ``reg_weight [K, 2d, P]``, ``reg_bias [K,
2d]`` (ridge regressors of :class:`~medetect.boxes.BoxCoder` targets on pool5, as the paper's Appendix C), ``has_svm
[K]`` (False: the class had no training positives and is never detected).

Context padding (the paper's Sec. A, "warp with p = 16"): the box is enlarged about its centre so that, once warped
to W pixels, the original box occupies ``W - 2p`` of them and ``p`` pixels of context surround it. Pixels outside
the image read as 0 in the normalised input (about the mean intensity, the paper's mean fill).

Fine-tuning forward: ``model(images, targets)`` with ``targets[i] = {"rois": [R_i, 2d], "roi_labels": [R_i]}``
(0 = background, 1..K = class) returns ``{"losses": {"rcnn_cls": cross-entropy}}`` (the Trainer's contract).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.resnet import ResNet
from ..boxes import BoxCoder, batched_nms, clip_boxes
from ..layers.nd import NORM_KINDS
from ..layers.roi_align import roi_align
from ..schema import check, option

__all__ = ["RCNN", "RCNNConfig", "build_rcnn", "context_boxes"]


@dataclass
class RCNNConfig:
    ndim: int = option(2, doc="spatial dims (the lineage: 2)", choices=(2, 3))
    in_channels: int = option(3, doc="image channels", ge=1)
    num_classes: int = option(1, doc="object classes, background excluded", ge=1)
    class_names: list[str] = option([], doc="names of labels 0..K-1")
    depth: int = option(18, doc="ResNet depth of the trunk", choices=(18, 34))
    base_width: int = option(32, doc="channels of the trunk's first stage", ge=1)
    norm: str = option("group", doc="normalisation of the trunk (GroupNorm: small batches from scratch)",
                       choices=NORM_KINDS)
    warp_size: int = option(64, doc="pixels per axis of a warped region (paper: 227; 224 costs ~20 s per image on "
                            "2 CPU cores, so the lineage uses 64: ~1 s)", ge=32)
    context_padding: float = option(4.5, doc="context pixels around the box at the warp size (paper: 16 of 227; "
                                    "4.5 of 64 is the same fraction)", ge=0)
    pool_size: int = option(2, doc="pool5: the trunk's last stage average-pooled to this many cells per axis", ge=1)
    hidden: int = option(512, doc="width of fc6 and fc7 (paper: 4096)", ge=1)
    dropout: float = option(0.5, doc="dropout after fc6 and fc7 while fine-tuning (paper: 0.5)", ge=0, lt=1)
    score_thresh: float = option(-1.0, doc="SVM margin below which a region is not a detection", ge=-1e6)
    nms_thresh: float = option(0.3, doc="per-class NMS IoU (paper: 0.3)", ge=0, le=1)
    detections_per_img: int = option(100, doc="detections kept per image after NMS", ge=1)
    warp_batch: int = option(256, doc="regions warped and run through the CNN at once at inference", ge=1)

    def validate(self, prefix: str = "model") -> None:
        check(self, prefix)
        if 2 * self.context_padding >= self.warp_size:
            raise ValueError(f"{prefix}.context_padding must be < warp_size / 2 = {self.warp_size / 2}, got "
                             f"{self.context_padding}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{prefix}.class_names must name all {prefix}.num_classes = {self.num_classes} classes, "
                             f"got {len(self.class_names)}")

    def to_dict(self) -> dict:
        return asdict(self)


def context_boxes(boxes: torch.Tensor, warp_size: int, padding: float) -> torch.Tensor:
    """Boxes ``[..., 2d]`` enlarged about their centres so that a warp of ``warp_size`` shows the original box in
    its central ``warp_size - 2 * padding`` pixels (the paper's context padding)."""
    d = boxes.shape[-1] // 2
    f = warp_size / (warp_size - 2.0 * padding)
    c = 0.5 * (boxes[..., :d] + boxes[..., d:])
    half = 0.5 * f * (boxes[..., d:] - boxes[..., :d])
    return torch.cat([c - half, c + half], -1)


class RCNN(nn.Module):
    def __init__(self, *, trunk: ResNet, config: RCNNConfig):
        super().__init__()
        cfg, d, k = config, config.ndim, config.num_classes
        self.config, self.trunk = config, trunk
        pool5 = trunk.out_channels[-1] * cfg.pool_size**d
        self.fc6 = nn.Linear(pool5, cfg.hidden)
        self.fc7 = nn.Linear(cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.cls = nn.Linear(cfg.hidden, k + 1)
        self.pool5_dim, self.fc7_dim = pool5, cfg.hidden
        self.register_buffer("svm_weight", torch.zeros(k, cfg.hidden))
        self.register_buffer("svm_bias", torch.zeros(k))
        self.register_buffer("reg_weight", torch.zeros(k, 2 * d, pool5))
        self.register_buffer("reg_bias", torch.zeros(k, 2 * d))
        self.register_buffer("has_svm", torch.zeros(k, dtype=torch.bool))
        self.box_coder = BoxCoder()

    # ------------------------------------------------------------------------------------------ parts
    def warp(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Normalised ``images [B, C, *S]`` and ``rois [R, 1 + 2d]`` (batch index, box) -> warps ``[R, C, W^d]``
        with context padding (bilinear, one sample per output pixel: a plain resize of the padded crop)."""
        cfg = self.config
        boxes = context_boxes(rois[:, 1:].float(), cfg.warp_size, cfg.context_padding)
        return roi_align(images, torch.cat([rois[:, :1].float(), boxes], 1), cfg.warp_size, spatial_scale=1.0,
                         sampling_ratio=1, aligned=True)

    def embed(self, warps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warps ``[R, C, W^d]`` -> ``(fc7 [R, F], pool5 [R, P])``."""
        d = self.config.ndim
        c5 = self.trunk(warps)["c5"]
        pool = getattr(F, f"adaptive_avg_pool{d}d")(c5, self.config.pool_size).flatten(1)  # [R, P]
        x = self.drop(F.relu(self.fc6(pool)))
        return self.drop(F.relu(self.fc7(x))), pool

    def score(self, fc7: torch.Tensor, pool5: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SVM margins ``[R, K]`` (-inf for a class without an SVM) and regressed boxes ``[R, K, 2d]``."""
        s = fc7.float() @ self.svm_weight.T + self.svm_bias  # [R, K]
        s = s.masked_fill(~self.has_svm, float("-inf"))
        t = torch.einsum("rp,kcp->rkc", pool5.float(), self.reg_weight) + self.reg_bias  # [R, K, 2d]
        return s, self.box_coder.decode(t, boxes[:, None].float())

    # ------------------------------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> dict:
        """Fine-tuning step: warps of every image's ``rois`` -> K + 1 softmax -> cross-entropy (see module doc)."""
        if targets is None:
            raise ValueError("RCNN.forward is the fine-tuning step and needs targets with rois and roi_labels; "
                             "use RCNN.detect for inference")
        d = self.config.ndim
        rois = torch.cat([torch.cat([torch.full((len(t["rois"]), 1), float(i), device=images.device),
                                     t["rois"].float()], 1) for i, t in enumerate(targets)])  # [R, 1 + 2d]
        labels = torch.cat([t["roi_labels"].long() for t in targets])  # [R]
        warps = self.warp(images, rois)  # [R, C, W^d]
        if self.training:  # random flips along every axis (cheap augmentation of the warps)
            for a in range(d):  # loop over the d axes
                flip = torch.rand(len(warps), device=warps.device) < 0.5
                warps = torch.where(flip.view(-1, *[1] * (d + 1)), warps.flip(2 + a), warps)
        fc7, _ = self.embed(warps)
        logits = self.cls(fc7)
        return {"losses": {"rcnn_cls": F.cross_entropy(logits, labels)}, "logits": logits}

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def features(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fc7 ``[N, F]`` and pool5 ``[N, P]`` of ``boxes [N, 2d]`` on one normalised image ``[C, *S]``, warped in
        batches of ``warp_batch``."""
        fc7, pool5 = [], []
        img = image[None]
        for s in range(0, len(boxes), self.config.warp_batch):  # loop over warp batches, not boxes
            b = boxes[s : s + self.config.warp_batch].float()
            rois = torch.cat([b.new_zeros(len(b), 1), b], 1)
            f, p = self.embed(self.warp(img, rois))
            fc7.append(f)
            pool5.append(p)
        if not fc7:
            return image.new_zeros(0, self.fc7_dim), image.new_zeros(0, self.pool5_dim)
        return torch.cat(fc7), torch.cat(pool5)

    @torch.no_grad()
    def detect(self, image: torch.Tensor, proposals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections of one normalised image ``[C, *S]`` from its ``proposals [N, 2d]``: ``{"boxes" [D, 2d],
        "scores" [D] (sigmoid of the SVM margin: monotone, 0..1), "labels" [D] in 0..K-1, "margins" [D]}``."""
        cfg = self.config
        d = image.ndim - 1
        shape = tuple(image.shape[1:])
        empty = {"boxes": image.new_zeros(0, 2 * d), "scores": image.new_zeros(0),
                 "labels": torch.zeros(0, dtype=torch.long, device=image.device), "margins": image.new_zeros(0)}
        if len(proposals) == 0:
            return empty
        fc7, pool5 = self.features(image, proposals)
        scores, boxes = self.score(fc7, pool5, proposals)  # [N, K], [N, K, 2d]
        k = scores.shape[1]
        boxes = clip_boxes(boxes, shape).reshape(-1, 2 * d)  # [N * K, 2d]
        scores = scores.reshape(-1)
        labels = torch.arange(k, device=scores.device).repeat(len(proposals))  # [N * K]
        sizes = boxes[:, d:] - boxes[:, :d]
        keep = (scores > cfg.score_thresh) & (sizes > 0).all(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if len(scores) == 0:
            return empty
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        return {"boxes": boxes[keep], "scores": torch.sigmoid(scores[keep]), "labels": labels[keep],
                "margins": scores[keep]}


def build_rcnn(cfg: RCNNConfig) -> RCNN:
    cfg.validate()
    trunk = ResNet(depth=cfg.depth, ndim=cfg.ndim, in_channels=cfg.in_channels, base_width=cfg.base_width,
                   norm_kind=cfg.norm)
    return RCNN(trunk=trunk, config=cfg)
