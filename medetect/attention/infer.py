"""Image probabilities and saliency maps of an attention classifier, on the prepared image grid.

``method``: ``"attention"`` (the model's own map A; for ``attention: none`` that is uniform) or ``"gradcam"``
(:func:`medetect.models.attention.grad_cam` for class 0, abnormal). The map on the feature grid is upsampled to the
prepared image grid (linear interpolation, ``align_corners=False``, i.e. cell centres map to cell centres), clipped at 0
and normalised to sum 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.attention import AttentionClassifier, grad_cam

__all__ = ["METHODS", "saliency"]

METHODS = ("attention", "gradcam")


def saliency(model: AttentionClassifier, images: torch.Tensor, method: str = "attention") -> tuple[torch.Tensor, torch.Tensor]:
    """``images [B, C, *S_in]`` -> ``(probabilities [B, K], saliency [B, *S_in])`` (module docstring)."""
    if method not in METHODS:
        raise ValueError(f"saliency method must be one of {list(METHODS)}, got {method!r}")
    model.eval()
    if method == "gradcam":
        out = grad_cam(model, images, 0)
        logits, sal = out["logits"], out["saliency"]
    else:
        with torch.no_grad():
            out = model(images)
        logits, sal = out["logits"], out["attention"]
    d = images.ndim - 2
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[d]
    up = F.interpolate(sal[:, None].float(), size=tuple(images.shape[2:]), mode=mode, align_corners=False)[:, 0]
    up = up.clamp_min(0)
    up = up / up.flatten(1).sum(1).clamp_min(1e-30).reshape(-1, *([1] * d))
    return torch.sigmoid(logits.float()).detach(), up.detach()
