"""Applications on top of the tasks (called by the command line): :mod:`.tasks` (the one task registry),
:mod:`.train` (``medetect train``, cross-validation folds), :mod:`.predict` and :mod:`.evaluate` (dispatch by the
model's task), :mod:`.export` (run folder -> model file, ONNX), :mod:`.plan` and :mod:`.convert` (data tools).
``load_model`` (model files and run folders) is :func:`medetect.engine.load.load_model`."""

from ..engine.load import load_model

__all__ = ["load_model"]
