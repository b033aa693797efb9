"""Detection losses, shape-agnostic (any leading shape, any d for box losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .boxes import check_boxes, elementwise_generalized_box_iou

__all__ = ["smooth_l1_loss", "sigmoid_focal_loss", "giou_loss"]

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def smooth_l1_loss(input: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0 / 9, reduction: str = "sum") -> torch.Tensor:
    """Smooth L1 (Huber / beta) of Fast R-CNN: ``0.5 x^2 / beta`` for ``|x| < beta`` else ``|x| - 0.5 beta``.

    ``beta = 1/9`` is the value of the Faster R-CNN reference code (the paper's sigma = 3, beta = 1 / sigma^2);
    ``beta = 0`` is plain L1.
    """
    if input.shape != target.shape:
        raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    diff = (input - target).abs()
    loss = diff if beta == 0 else torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return _reduce(loss, reduction)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log(p_t)`` on sigmoid logits, any shape.

    ``targets`` are in [0, 1] (float), same shape as ``logits``; ``alpha < 0`` disables the class weighting.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """``1 - GIoU`` of matching boxes ``[..., 2d]`` (Rezatofighi et al. 2019), any d."""
    d = check_boxes(pred, "pred")
    check_boxes(target, "target", d=d)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    return _reduce(1.0 - elementwise_generalized_box_iou(pred, target), reduction)
