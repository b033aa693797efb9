"""``medetect export``: a training run folder -> one shippable model file (any kind, through the one writer
:func:`medetect.models.io.save_model`), and the dense part of a detector -> ONNX."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..engine.load import load_model
from ..files import write_atomically
from ..models.io import save_model

__all__ = ["export_from_run", "export_onnx"]


class _DenseGraph(torch.nn.Module):
    """The exportable part of a detector: backbone + FPN + the dense head (RPN or RetinaNet head) raw outputs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        feats = self.model.features(image)
        if self.model.rpn is not None:
            logits, deltas = self.model.rpn.head(feats)
        else:
            logits, deltas = self.model.heads.head(feats)
            return (*feats, logits, deltas)
        return (*feats, *logits, *deltas)


def export_onnx(weights, out: str | Path, image_shape: Sequence[int]) -> Path:
    """Export the dense part of a detector (backbone, FPN and the RPN / RetinaNet head's raw outputs) to ONNX; the
    file is written atomically with mode 0644.

    Proposal selection, RoI pooling of the selected proposals and NMS stay in medetect: their output sizes depend on
    the data, which an ONNX graph cannot express exactly. Needs the ``onnx`` package (``pip install medetect[onnx]``).
    """
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'medetect[onnx]'") from e
    loaded = load_model(weights)
    if loaded.kind != "detector":
        raise ValueError(f"{weights}: ONNX export supports detectors, this model is a {loaded.kind!r}")
    model = loaded.model
    if model.config.arch not in ("faster_rcnn", "retinanet"):
        raise ValueError(f"{weights}: ONNX export supports the faster_rcnn and retinanet detectors, this one is "
                         f"{model.config.arch}")
    if len(image_shape) != model.config.ndim:
        raise ValueError(f"--onnx needs {model.config.ndim} sizes (the model is {model.config.ndim}D), got {list(image_shape)}")
    if not all(int(s) == s and s > 0 for s in image_shape):
        raise ValueError(f"--onnx sizes must be positive whole numbers, got {list(image_shape)}")
    dummy = torch.zeros(1, model.config.in_channels, *(int(s) for s in image_shape))
    return write_atomically(out, lambda tmp: torch.onnx.export(_DenseGraph(model).eval(), (dummy,), str(tmp),
                                                              input_names=["image"], opset_version=17, dynamo=False))


def export_from_run(run_dir: str | Path, out: str | Path, extra: dict | None = None, *, best: bool = False,
                    fp16: bool | None = None) -> Path:
    """A training run folder (its newest checkpoint, or with ``best`` the best validation epoch of ``best.json``)
    -> one self-describing model file. ``fp16``: store floating-point tensors in float16 (default: detectors yes,
    other kinds no, as the first releases shipped them)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    m = load_model(run_dir, best=best)
    info = {**m.meta.get("extra", {}), **(extra or {})}
    return save_model(m.model, out, kind=m.kind, preprocess=m.preprocess, classes=m.classes, task=m.task, extra=info,
                      fp16=m.kind == "detector" if fp16 is None else fp16)
