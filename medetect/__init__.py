"""medetect: object detection for medical images, 2D and 3D, in pure PyTorch.

Box convention (the one idea the library rests on): every box is a tensor ``[..., 2d]`` laid out
``(lo_1..lo_d, hi_1..hi_d)`` in array-axis order (2D ``(y0, x0, y1, x1)``, 3D ``(z0, y0, x0, z1, y1, x1)``),
in voxel units, half-open (size = hi - lo). Voxel ``i`` covers ``[i, i + 1)``, so its centre is ``i + 0.5``.
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__", "load_model"]

# The entry points of the library, imported on first use so that ``import medetect`` stays light (no torch):
#   model = medetect.load_model("model.safetensors")   # a model file or a training run folder
#   det = medetect.Predictor(model.model).predict_image(image, model.preprocess)
_LAZY = {"load_model": ("medetect.engine.load", "load_model"), "Predictor": ("medetect.engine.predictor", "Predictor")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups find it without coming here
        return value
    raise AttributeError(f"module 'medetect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
