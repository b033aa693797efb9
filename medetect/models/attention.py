"""Attention classifier: image-level labels, with a spatial attention map that boxes/lesion heatmaps can supervise.

Shape key: ``B`` batch, ``C`` feature channels, ``K`` classes (independent sigmoid outputs, e.g. abnormal and
malignant), ``S = (S_1 .. S_d)`` the feature grid, ``S_in`` the input grid.

``image [B, c, *S_in] -> ResNet (any d) -> F [B, C, *S] (level feature_level) -> 1x1 conv -> attention logits
[B, *S] -> A -> pooled = sum_S A * F [B, C] -> dropout -> linear -> logits [B, K]``.

``attention`` (how A is made):

* ``"softmax"``: ``A = softmax over S`` of the logits -- A is a distribution (sums to 1), pooling a weighted mean;
* ``"sigmoid"``: ``a = sigmoid(logits)`` in [0, 1] per voxel (several lesions can all be fully on), pooling
  ``sum a F / sum a``; the normalised map ``a / sum a`` is the reported attention;
* ``"none"``: the plain classifier (global average pooling); its saliency is Grad-CAM (:func:`grad_cam`).

Loss (Pesce et al. 2019; Li et al. 2020): ``classification BCE + attention_weight (lambda) x attention loss``, the
attention loss averaged over the images of the batch that HAVE a heatmap (``has_heatmap``; a heatmap of zeros counts
as none). Images without a heatmap -- normal images, and abnormal images whose lesions have no location (MIAS
mdb059, mdb245) -- contribute only the classification loss, so weakly labelled images are used. ``lambda = 0`` is
the unsupervised-attention baseline.

* ``attention_loss: "kl"``: ``KL(T || A)`` with ``T`` the heatmap pooled to the feature grid and normalised to sum 1;
* ``"bce"``: per-voxel BCE between the attention logits and the heatmap pooled to the grid, scaled to peak 1.

Heatmaps come at the feature grid ``S`` or at any integer multiple of it (e.g. the input grid; they are then
area-averaged to ``S``); any other shape is an error naming both shapes.

``forward(images, targets=None) -> {"logits": [B, K], "attention": [B, *S] (sums to 1), "losses": {...}}``;
``targets`` a list of per-image dicts ``{"labels": [K] float, "heatmap": [*S or multiple] float, "has_heatmap":
bool tensor}`` (``heatmap`` may be absent or empty: no heatmap).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import build_backbone
from ..backbones.pretrained import check_pretrained_options, load_pretrained
from ..backbones.resnet import RESNET_DEPTHS, ResNet
from ..layers.nd import NORM_KINDS, conv, freeze_batch_norm
from ..schema import check, option

__all__ = ["ATTENTION_KINDS", "AttentionConfig", "AttentionClassifier", "build_attention", "grad_cam",
           "pool_heatmap"]

ATTENTION_KINDS = ("softmax", "sigmoid", "none")


ATTENTION_BACKBONES = ("resnet", "efficientnet_lite0")


@dataclass
class AttentionConfig:
    ndim: int = option(2, doc="spatial dims of the images (2: mammograms, 3: CT cubes)", choices=(1, 2, 3))
    in_channels: int = option(1, doc="input channels", ge=1)
    num_classes: int = option(2, doc="independent sigmoid outputs (e.g. abnormal, malignant)", ge=1)
    backbone: str = option("resnet", doc="feature extractor: resnet (of depth `depth`) or efficientnet_lite0 "
                           "(MBConv blocks; with backbone_weights efficientnet-lite0-imagenet an ImageNet start, "
                           "norm batch)", choices=ATTENTION_BACKBONES)
    depth: int = option(18, doc="ResNet depth of the backbone", choices=tuple(RESNET_DEPTHS))
    base_width: int = option(16, doc="channels of the ResNet stem (x2 per stage)", ge=1)
    feature_level: int = option(4, doc="feature map used (c2: stride 4, c3: stride 8, c4: stride 16, c5: stride 32; "
                                "halved without stem_pool)", ge=2, le=5)
    stem_pool: bool = option(True, doc="max-pool after the stem (false: every stride halved, a finer attention map)")
    norm: str = option("group", doc="normalisation layer (see medetect.layers.nd.norm); pretrained weights need "
                       "batch", choices=NORM_KINDS)
    backbone_weights: str = option("", doc="start the ResNet from a torchvision-format state dict of the same depth "
                                   "(.pth/.pt read as tensors only, or .safetensors; base_width 64, norm batch): fc "
                                   "skipped, 3D kernels inflated from 2D, in_channels 1 sums the RGB kernels of the "
                                   "first conv (see medetect.backbones.pretrained); empty: random start", path=True)
    freeze_bn: bool = option(False, doc="freeze the ResNet's BatchNorm statistics and affine; only with "
                             "backbone_weights (a random start always trains its normalisation)")
    attention: str = option("softmax", doc="softmax (a distribution over the grid), sigmoid (per-voxel gate) or "
                            "none (plain classifier, global average pooling; saliency by Grad-CAM)",
                            choices=ATTENTION_KINDS)
    attention_weight: float = option(1.0, doc="lambda: weight of the attention loss (0: unsupervised attention)", ge=0)
    attention_loss: str = option("kl", doc="kl (KL(heatmap || attention), both normalised to sum 1) or bce (per-voxel "
                                 "BCE of the attention logits to the peak-1 heatmap)", choices=("kl", "bce"))
    dropout: float = option(0.3, doc="dropout before the final linear layer", ge=0, lt=1)
    pos_weight: list[float] = option([], doc="BCE weight of the positive class per output (empty: 1 each)", gt=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def backbone_name(self) -> str:
        """The backbone's name in :data:`medetect.backbones.BACKBONES` (``resnet18``, ``efficientnet_lite0``, ...)."""
        return f"resnet{self.depth}" if self.backbone == "resnet" else self.backbone

    def validate(self, prefix: str = "model") -> None:
        check(self, prefix)
        check_pretrained_options(backbone=self.backbone_name, norm=self.norm, weights=self.backbone_weights,
                                 freeze_bn=self.freeze_bn, prefix=prefix)
        if self.attention == "none" and self.attention_weight > 0:
            raise ValueError(f"{prefix}.attention_weight must be 0 when {prefix}.attention is none (the plain "
                             f"classifier has no attention map to supervise), got {self.attention_weight:g}")
        if self.pos_weight and len(self.pos_weight) != self.num_classes:
            raise ValueError(f"{prefix}.pos_weight must have {self.num_classes} values (one per output) or none, "
                             f"got {len(self.pos_weight)}")


def pool_heatmap(heatmaps: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``[B, *S_h]`` heatmaps -> ``[B, *grid]`` by area averaging; ``S_h`` must equal ``grid`` or be an integer
    multiple of it per axis (else ``ValueError`` naming both shapes)."""
    h = tuple(heatmaps.shape[1:])
    if h == tuple(grid):
        return heatmaps
    if len(h) != len(grid) or any(a % b for a, b in zip(h, grid)):
        raise ValueError(f"heatmap shape {list(h)} does not match the feature map {list(grid)} (or an integer "
                         "multiple of it)")
    k = tuple(a // b for a, b in zip(h, grid))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(grid)]
    return pool(heatmaps[:, None], k, k)[:, 0]


class AttentionClassifier(nn.Module):
    """Image classifier with a (supervisable) spatial attention map (module docstring)."""

    def __init__(self, config: AttentionConfig | None = None):
        super().__init__()
        cfg = config or AttentionConfig()
        cfg.validate()
        self.config = cfg
        if cfg.backbone == "resnet":
            self.backbone = ResNet(depth=cfg.depth, ndim=cfg.ndim, in_channels=cfg.in_channels,
                                   base_width=cfg.base_width, norm_kind=cfg.norm, stem_pool=cfg.stem_pool)
        else:
            self.backbone = build_backbone(cfg.backbone, ndim=cfg.ndim, in_channels=cfg.in_channels,
                                           base_width=cfg.base_width, norm_kind=cfg.norm)
        c = self.backbone.out_channels[cfg.feature_level - 2]
        self.attn = conv(cfg.ndim)(c, 1, 1)
        nn.init.zeros_(self.attn.weight)  # uniform attention at the start: training begins as global average pooling
        nn.init.zeros_(self.attn.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(c, cfg.num_classes)
        pw = torch.tensor(cfg.pos_weight or [1.0] * cfg.num_classes, dtype=torch.float32)
        self.register_buffer("pos_weight", pw, persistent=False)

    @property
    def stride(self) -> tuple[int, ...]:
        return self.backbone.strides[self.config.feature_level - 2]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if images.ndim != cfg.ndim + 2 or images.shape[1] != cfg.in_channels:
            raise ValueError(f"images must have shape [B, {cfg.in_channels}, *{cfg.ndim} sizes], got "
                             f"{tuple(images.shape)}")
        return self.backbone(images, up_to=cfg.feature_level)[f"c{cfg.feature_level}"]  # [B, C, *S]

    def head(self, feats: torch.Tensor) -> dict:
        """Features ``[B, C, *S]`` -> logits, normalised attention and the attention logits."""
        cfg = self.config
        b, c = feats.shape[:2]
        grid = feats.shape[2:]
        flat = feats.flatten(2)  # [B, C, prod S]
        a_logit = self.attn(feats).flatten(1)  # [B, prod S]
        if cfg.attention == "softmax":
            attn = torch.softmax(a_logit.float(), dim=1).to(flat.dtype)
        elif cfg.attention == "sigmoid":
            gate = torch.sigmoid(a_logit)
            attn = gate / gate.sum(1, keepdim=True).clamp_min(1e-6)
        else:
            attn = torch.full_like(a_logit, 1.0 / a_logit.shape[1])
        pooled = (flat * attn[:, None, :]).sum(-1)  # [B, C]
        logits = self.fc(self.drop(pooled))  # [B, K]
        return {"logits": logits, "attention": attn.reshape(b, *grid), "attention_logits": a_logit.reshape(b, *grid)}

    def forward(self, images: torch.Tensor, targets=None) -> dict:
        out = self.head(self.features(images))
        out["losses"] = {}
        if targets is not None:
            out["losses"] = self.losses(out, targets)
        return out

    def losses(self, out: dict, targets) -> dict:
        cfg = self.config
        logits = out["logits"]
        b = logits.shape[0]
        if len(targets) != b:
            raise ValueError(f"targets must have one entry per image ({b}), got {len(targets)}")
        y = torch.stack([torch.as_tensor(t["labels"], dtype=torch.float32).reshape(-1) for t in targets]).to(logits.device)
        if y.shape != logits.shape:
            raise ValueError(f"each target needs {cfg.num_classes} labels, got {y.shape[1]}")
        cls = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=self.pos_weight.to(logits.device))
        losses = {"cls_bce": cls}
        if cfg.attention_weight > 0:
            losses["attention"] = cfg.attention_weight * self._attention_loss(out, targets)
        return losses

    def _attention_loss(self, out: dict, targets) -> torch.Tensor:
        cfg = self.config
        a_logit = out["attention_logits"].float()  # [B, *S]
        grid = tuple(a_logit.shape[1:])
        dev = a_logit.device
        maps = []
        for t in targets:  # loop over the images of a batch (stacking)
            h = t.get("heatmap")
            h = torch.zeros(grid, device=dev) if h is None or h.numel() == 0 else h.to(dev, torch.float32)
            maps.append(h)
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) > 1:
            raise ValueError(f"all heatmaps of a batch need the same shape, got {sorted(shapes)}")
        hm = pool_heatmap(torch.stack(maps), grid).flatten(1)  # [B, prod S]
        has = torch.stack([torch.as_tensor(t.get("has_heatmap", True), device=dev).reshape(()) for t in targets])
        total = hm.sum(1)
        has = has.bool() & (total > 0)  # [B]
        flat = a_logit.flatten(1)
        if cfg.attention_loss == "kl":
            target = hm / total.clamp_min(1e-12)[:, None]
            if cfg.attention == "softmax":
                log_a = torch.log_softmax(flat, 1)
            else:
                gate = torch.sigmoid(flat)
                log_a = torch.log((gate / gate.sum(1, keepdim=True)).clamp_min(1e-12))
            per = (target * (torch.log(target.clamp_min(1e-12)) - log_a)).sum(1)  # [B]
        else:
            target = hm / hm.amax(1, keepdim=True).clamp_min(1e-12)
            per = F.binary_cross_entropy_with_logits(flat, target, reduction="none").mean(1)
        w = has.float()
        return (per * w).sum() / w.sum().clamp_min(1.0)


def grad_cam(model: AttentionClassifier, images: torch.Tensor, class_index: int = 0) -> dict:
    """Grad-CAM (Selvaraju et al. 2017) on the feature map the attention uses: per channel the spatial mean of
    ``d logit_k / d F``, ``cam = relu(sum_c w_c F_c)``, normalised to sum 1 over the grid (uniform when all zero).
    Returns ``{"logits": [B, K], "saliency": [B, *S]}``. Works for every ``attention`` kind (the plain classifier's
    saliency baseline)."""
    with torch.enable_grad():
        feats = model.features(images).detach().requires_grad_(True)
        out = model.head(feats)
        (g,) = torch.autograd.grad(out["logits"][:, class_index].sum(), feats)
    w = g.flatten(2).mean(-1)  # [B, C]
    cam = F.relu((w[:, :, None] * feats.detach().flatten(2)).sum(1))  # [B, prod S]
    tot = cam.sum(1, keepdim=True)
    cam = torch.where(tot > 0, cam / tot.clamp_min(1e-12), torch.full_like(cam, 1.0 / cam.shape[1]))
    return {"logits": out["logits"].detach(), "saliency": cam.reshape(feats.shape[0], *feats.shape[2:])}


def build_attention(config: AttentionConfig | dict | None = None, *, pretrained: bool = True) -> AttentionClassifier:
    """The classifier of ``config``; ``pretrained``: load ``backbone_weights`` into its ResNet (False when a model
    file's own weights follow). ``freeze_bn`` freezes the ResNet's BatchNorm."""
    if isinstance(config, dict):
        config = AttentionConfig(**config)
    model = AttentionClassifier(config)
    cfg = model.config
    if pretrained and cfg.backbone_weights:
        load_pretrained(model.backbone, cfg.backbone_name, cfg.backbone_weights, key="model.backbone_weights")
    if cfg.freeze_bn:
        freeze_batch_norm(model.backbone)
    return model
