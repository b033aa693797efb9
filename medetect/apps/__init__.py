"""Applications on top of the library (called by the command line): :mod:`.predict` (detect in images and volumes),
:mod:`.evaluate` (mAP on a labelled folder), :mod:`.export` (run folder -> model file, ONNX), :mod:`.models` (the one
loader: model files and run folders)."""

from ..engine.load import load_model

__all__ = ["load_model"]
