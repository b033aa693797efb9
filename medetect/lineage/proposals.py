"""Selective-search proposals for the lineage: the settings (one config section shared by R-CNN, Fast R-CNN and the
recall study) and a per-image disk cache, so that training R-CNN and Fast R-CNN segments each image once.

The cache is one ``.npz`` per image in ``cache_dir`` named after the image and a hash of the settings and the image
size; a damaged file is recomputed (never trusted) and files are written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..proposals import SS_MODES, selective_search
from ..schema import check, option
from .data import LineageSet

__all__ = ["ProposalConfig", "proposals_for", "propose"]


@dataclass
class ProposalConfig:
    mode: str = option("fast", doc="selective search strategy set (OpenCV's fast or quality; R-CNN and Fast R-CNN "
                       "used fast)", choices=SS_MODES)
    base_k: int = option(50, doc="first Felzenszwalb threshold k (the paper's smallest k, 50: finds the small "
                         "platelets; OpenCV's default 150 misses them)", ge=1)
    inc_k: int = option(100, doc="increment of k between strategies", ge=1)
    sigma: float = option(0.8, doc="Gaussian smoothing before the graph segmentation", gt=0)
    max_proposals: int = option(2000, doc="proposals kept per image, in selective search's rank order (the "
                                "papers: about 2000)", ge=1)
    scale: float = option(1.0, doc="run the segmentation on the image resized by this factor (its cost grows with "
                          "the pixel count); boxes are mapped back", gt=0, le=4)

    def validate(self, prefix: str = "proposals") -> None:
        check(self, prefix)

    def to_dict(self) -> dict:
        return asdict(self)


def propose(image: torch.Tensor, cfg: ProposalConfig) -> torch.Tensor:
    """Selective-search boxes ``[N, 4]`` of one ``[C, H, W]`` image (raw 0..255) with the settings ``cfg``."""
    return selective_search(image, mode=cfg.mode, max_proposals=cfg.max_proposals, scale=cfg.scale,
                            base_k=cfg.base_k, inc_k=cfg.inc_k, sigma=cfg.sigma)


def _key(cfg: ProposalConfig, image: torch.Tensor) -> str:
    blob = json.dumps({**cfg.to_dict(), "shape": list(image.shape)}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def proposals_for(data: LineageSet, cfg: ProposalConfig, cache_dir: str | os.PathLike | None = None,
                  progress: bool = False) -> list[torch.Tensor]:
    """Proposals of every image of ``data`` (list of ``[N_i, 4]``), read from / written to ``cache_dir`` when given."""
    out = []
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(data.images):
        file = None
        if cache is not None:
            stem = Path(data.ids[i]).stem or f"image{i}"
            file = cache / f"{stem}.{_key(cfg, image)}.npz"
            if file.is_file():
                try:
                    with np.load(file) as z:
                        out.append(torch.from_numpy(z["boxes"].astype(np.float32)).reshape(-1, 4))
                    continue
                except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
                    pass
        boxes = propose(image, cfg)
        if file is not None:
            fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npz.tmp")
            os.close(fd)
            with open(tmp, "wb") as f:
                np.savez(f, boxes=boxes.numpy())
            os.replace(tmp, file)
        out.append(boxes)
        if progress and (i + 1) % 25 == 0:
            print(f"selective search: {i + 1}/{len(data)} images", flush=True)
    return out
