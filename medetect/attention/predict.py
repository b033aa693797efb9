"""``medetect predict`` for an ``attention`` model: image probabilities and an attention overlay PNG per input.

Output in ``out_dir``: ``scores.csv`` (``input,<class>...``, one row per input, probabilities in [0, 1]),
``predictions.json`` (``{input: {"scores": {class: p}, "overlay": png, "peak": [voxel centre of the saliency
maximum on the INPUT grid]}}``) and ``<stem>_attention.png``: the input (min-max scaled to grey) with the saliency
map (upsampled to the input grid) blended in the ``jet`` colour map where it is above 10 % of its maximum. A volume
gives its three orthogonal mid-slices side by side (axial, coronal, sagittal in array order ``z, y, x``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import torch.nn.functional as F

from ..data.io import read_image
from ..data.preprocess import prepare
from ..engine.tasks import INPUT_ERRORS, first_line, write_errors
from .infer import saliency

__all__ = ["overlay_rgb", "predict_attention"]


def overlay_rgb(image: np.ndarray, sal: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """2D grey ``image [H, W]`` + saliency ``[H, W]`` -> ``uint8 [H, W, 3]`` overlay (module docstring)."""
    from matplotlib import colormaps

    g = image.astype(np.float64)
    g = (g - g.min()) / max(1e-12, float(g.max() - g.min()))
    s = sal / max(1e-30, float(sal.max()))
    heat = colormaps["jet"](s)[..., :3]
    a = alpha * (s >= 0.1)[..., None]
    rgb = (1 - a) * g[..., None] + a * heat
    return (rgb * 255).round().clip(0, 255).astype(np.uint8)


def _panels(image: np.ndarray, sal: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return overlay_rgb(image, sal)
    mid = [s // 2 for s in image.shape]
    views = [overlay_rgb(image[mid[0]], sal[mid[0]]), overlay_rgb(image[:, mid[1]], sal[:, mid[1]]),
             overlay_rgb(image[:, :, mid[2]], sal[:, :, mid[2]])]
    h = max(v.shape[0] for v in views)
    return np.concatenate([np.pad(v, ((0, h - v.shape[0]), (0, 2), (0, 0))) for v in views], 1)


def predict_attention(loaded, files: Sequence[Path], out_dir: Path, *, method: str | None = None, device=None,
                      allow_range_mismatch: bool = False, skip_errors: bool = False) -> list[Path]:
    """Score every input file and write the overlays (module docstring). With ``skip_errors`` an input that cannot
    be read or prepared goes to ``errors.csv`` instead of stopping the run. Returns the overlay paths."""
    from PIL import Image

    model = loaded.model
    method = method or ("gradcam" if model.config.attention == "none" else "attention")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    rows, everything, written, errors = [], {}, [], []
    for f in files:  # one input at a time (files of different sizes)
        try:
            img = read_image(f)
            p = prepare(img, loaded.preprocess, allow_range_mismatch=allow_range_mismatch)
        except INPUT_ERRORS as e:
            if not skip_errors:
                raise
            errors.append((str(f), first_line(e)))
            continue
        probs, sal = saliency(model, p.tensor[None].float().to(dev), method)
        d = sal.ndim - 1
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[d]
        full = F.interpolate(sal[:, None], size=p.input_shape, mode=mode, align_corners=False)[0, 0].clamp_min(0)
        full = full.cpu().numpy()
        arr = np.asarray(img.array[0], dtype=np.float64)
        stem = Path(f).name.split(".")[0]
        png = out_dir / f"{stem}_attention.png"
        n = 1
        while png in written:
            n += 1
            png = out_dir / f"{stem}_{n}_attention.png"
        Image.fromarray(_panels(arr, full)).save(png)
        written.append(png)
        pr = probs[0].cpu().numpy().astype(np.float64)
        peak = (np.array(np.unravel_index(int(np.argmax(full)), full.shape), dtype=np.float64) + 0.5).tolist()
        rows.append([str(f), *(f"{v:.6f}" for v in pr)])
        everything[str(f)] = {"scores": {c: round(float(v), 6) for c, v in zip(loaded.classes, pr)},
                              "overlay": png.name, "peak": peak, "saliency": method}
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["input", *loaded.classes])
        w.writerows(rows)
    (out_dir / "predictions.json").write_text(json.dumps(everything))
    write_errors(out_dir, errors, len(written))
    return written


