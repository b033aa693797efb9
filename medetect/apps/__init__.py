"""Applications on top of the library (called by the command line): :mod:`.predict` (detect in images and volumes),
:mod:`.evaluate` (mAP on a labelled folder), :mod:`.export` (run folder -> model file, ONNX)."""
