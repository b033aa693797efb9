"""Selective search through OpenCV's implementation (``cv2.ximgproc.segmentation``; the optional dependency group
``medetect[lineage]`` installs ``opencv-contrib-python-headless``).

Modes (OpenCV's names): ``fast`` (HSV and Lab colour spaces, two Felzenszwalb k values, the paper's "Fast" setting),
``quality`` (more colour spaces and k values, the paper's "Quality" setting, about 4x slower), ``single`` (one
strategy). OpenCV returns ``(x, y, w, h)`` rectangles in its hierarchical-grouping order, which the paper uses as the
ranking (pseudo-random within a level); we keep that order, drop exact duplicates and degenerate boxes, and return
half-open ``(y0, x0, y1, x1)`` pixel boxes: a rectangle ``(x, y, w, h)`` covers pixels ``x .. x + w - 1``, i.e. edges
``[x, x + w)``.

OpenCV draws the pseudo-random part of the ranking from the C library's ``rand()``; ``seed`` (default 0) seeds it
through ``srand`` before each call, so the same image gives the same ranked list every time (where the C library
cannot be reached through ctypes the ranking is left unseeded, with a warning once).

``scale`` < 1 runs the segmentation on a resized copy (the cost grows with the pixel count) and maps the boxes back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import warnings

import numpy as np
import torch

__all__ = ["SS_MODES", "selective_search", "require_opencv_contrib"]

SS_MODES = ("fast", "quality", "single")


_LIBC: list = []


def _seed_c_rand(seed: int) -> None:
    if not _LIBC:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None)
            _LIBC.append(lib.srand)
        except (OSError, AttributeError):
            _LIBC.append(None)
            warnings.warn("cannot reach the C library's srand: selective search's ranking is not reproducible here",
                          stacklevel=3)
    if _LIBC[0] is not None:
        _LIBC[0](ctypes.c_uint(int(seed) & 0xFFFFFFFF))


def require_opencv_contrib():
    """The ``cv2`` module with the contrib ``ximgproc`` package, or one sentence saying how to install it."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2, "ximgproc"):
        raise RuntimeError("selective search needs OpenCV's contrib modules (cv2.ximgproc): "
                           "pip install 'medetect[lineage]' (opencv-contrib-python-headless; a plain opencv-python "
                           "installed beside it hides them: uninstall it)")
    return cv2


def _to_bgr_uint8(image) -> np.ndarray:
    """``[C, H, W]`` tensor (0..255) or ``H x W (x C)`` array -> contiguous ``H x W x 3`` uint8 BGR (grey repeated)."""
    if isinstance(image, torch.Tensor):
        a = image.detach().cpu()
        if a.dim() == 2:
            a = a[None]
        if a.dim() != 3:
            raise ValueError(f"selective search takes a 2D image [C, H, W], got shape {tuple(image.shape)}")
        a = a.float().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    else:
        a = np.asarray(image)
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3:
            raise ValueError(f"selective search takes a 2D image H x W (x C), got shape {a.shape}")
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] >= 3:
        a = a[..., 2::-1]  # RGB -> BGR, OpenCV's channel order (it converts to HSV/Lab itself)
    else:
        raise ValueError(f"selective search needs 1 or 3 channels, got {a.shape[2]}")
    return np.ascontiguousarray(a)


def selective_search(image, *, mode: str = "fast", max_proposals: int = 2000, scale: float = 1.0,
                     base_k: int = 150, inc_k: int = 150, sigma: float = 0.8, min_size: float = 2.0,
                     threads: int | None = 1, seed: int | None = 0) -> torch.Tensor:
    """Selective-search proposals of one image: float32 ``[N, 4]`` ``(y0, x0, y1, x1)`` in pixels of ``image``,
    N <= ``max_proposals``, in the algorithm's rank order. ``min_size``: boxes thinner than this (pixels of the
    image given) are dropped. ``threads``: OpenCV's thread count for the call (1 = deterministic timing beside
    torch; None = leave OpenCV's setting). ``base_k``, ``inc_k``, ``sigma``: the Felzenszwalb graph segmentation's
    first threshold k, its increment between strategies and its Gaussian smoothing (OpenCV's defaults 150, 150, 0.8;
    the paper's k values start at 50, which finds the small cells of blood smears). An image where nothing is found
    gives ``[0, 4]``. ``seed``: seeds the ranking's randomness (None: leave it unseeded)."""
    if mode not in SS_MODES:
        raise ValueError(f"selective search mode must be one of {list(SS_MODES)}, got {mode!r}")
    if base_k < 1 or inc_k < 1 or sigma <= 0:
        raise ValueError(f"selective search needs base_k >= 1, inc_k >= 1 and sigma > 0, got {base_k}, {inc_k}, {sigma}")
    if max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
    if not 0 < scale <= 4:
        raise ValueError(f"selective search scale must be in (0, 4], got {scale}")
    cv2 = require_opencv_contrib()
    bgr = _to_bgr_uint8(image)
    h, w = bgr.shape[:2]
    if scale != 1.0:
        bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if threads is not None:
        cv2.setNumThreads(int(threads))
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if mode == "single":
        ss.switchToSingleStrategy(int(base_k), float(sigma))
    else:
        {"fast": ss.switchToSelectiveSearchFast, "quality": ss.switchToSelectiveSearchQuality}[mode](
            int(base_k), int(inc_k), float(sigma))
    if seed is not None:
        _seed_c_rand(seed)
    rects = ss.process()
    if rects is None or len(rects) == 0:
        return torch.zeros(0, 4)
    r = torch.as_tensor(np.asarray(rects, dtype=np.float32).reshape(-1, 4))  # x, y, w, h at the resized scale
    boxes = torch.stack([r[:, 1], r[:, 0], r[:, 1] + r[:, 3], r[:, 0] + r[:, 2]], dim=1)
    if scale != 1.0:
        sy, sx = h / bgr.shape[0], w / bgr.shape[1]
        boxes = boxes * torch.tensor([sy, sx, sy, sx])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes = boxes[keep]
    # first occurrence of each distinct box, in rank order (one vectorised pass, no loop over boxes)
    _, inverse = torch.unique(boxes, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(boxes), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(boxes)), reduce="amin")
    boxes = boxes[first.sort().values]
    return boxes[:max_proposals].contiguous()
