"""``medetect evaluate --weights W --data FOLDER:SPLIT`` for an ``attention`` model on a mini-MIAS-layout folder."""

from __future__ import annotations

from ..evaluation.attention import attention_metrics
from ..data.lesion_folder import read_lesion_folder
from .data import LesionImages
from .infer import METHODS
from .train import score_dataset

__all__ = ["evaluate_attention"]


def evaluate_attention(loaded, folder, split: str, *, method: str | None = None, n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """Image AUC (abnormal, malignant), pointing game, attention in lesion, attention FROC, with ``_ci`` (bootstrap
    by patient) -- :mod:`medetect.evaluation.attention`. ``method``: ``attention`` or ``gradcam``; default the
    model's own (``gradcam`` for ``attention: none``)."""
    if n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0, got {n_boot}")
    model = loaded.model
    if method is None:
        method = "gradcam" if model.config.attention == "none" else "attention"
    if method not in METHODS:
        raise ValueError(f"--saliency must be one of {list(METHODS)}, got {method!r}")
    if list(loaded.classes) != ["abnormal", "malignant"]:
        raise ValueError(f"a lesion folder is scored for the classes ['abnormal', 'malignant'], this model has "
                         f"{list(loaded.classes)}")
    data = LesionImages(read_lesion_folder(folder, split), loaded.preprocess)
    r = score_dataset(model, data, method=method)
    res = attention_metrics(r["scores"], r["labels"], r["saliencies"], r["centres"], r["radii"], r["patients"],
                            spacing=r["spacings"][0], n_boot=n_boot, seed=seed)
    return {**res, "saliency": method, "split": split}
