"""Benchmark medetect.layers.roi_align / roi_pool (2D against torchvision where it imports, and 3D).

Prints one JSON line per figure with ``bench``, ``device``, ``threads``, ``impl``, the shapes (``features``,
``rois``, ``output``, ``sampling_ratio``), ``median_ms`` (median of ``--repeats`` timed calls after warm-up,
each bracketed by a CUDA synchronisation), ``ref_impl``, ``ref_median_ms``, ``ratio`` (= ref_median_ms /
median_ms: our speed-up, > 1 means medetect is faster), ``ours_over_ref`` (its inverse) and
``max_abs_diff`` (forward outputs vs the reference). Reference fields are null where there is no reference
(3D) or torchvision is not importable.

Figures, each as forward (``..._fwd``, under no_grad) and forward + backward (``..._fwd_bwd``):

* ``roi_align_2d``: 1000 RoIs on ``[2, 256, 200, 272]`` (stride 4 of an 800 x 1088 image, boxes 16-400 px)
  to 7x7, sampling 2, vs ``torchvision.ops.roi_align``.
* ``roi_align_3d``: 500 RoIs on ``[1, 128, 48, 128, 128]`` (stride 2 of a 96 x 256 x 256 volume, boxes 8-64
  voxels) to 7x7x7, sampling 2 (GPU target: forward <= 5 ms). On the CPU it runs only with ``--full``; the
  default CPU run has ``roi_align_3d_small``: 200 RoIs on ``[1, 64, 24, 64, 64]``.
* ``roi_pool_2d``: 500 RoIs on ``[2, 64, 100, 136]`` to 7x7 vs ``torchvision.ops.roi_pool`` (the exact,
  sync-free sparse-table max costs ``prod_a log2 N_a`` passes over the map; shown for scale, not a target).

    python benchmarks/bench_roi_align.py [--device cpu|cuda] [--repeats N] [--threads N] [--full]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _timing
sys.path.insert(1, str(HERE.parent))  # medetect from this checkout when it is not installed

from _timing import default_device, time_call  # noqa: E402

from medetect.layers import roi_align, roi_pool  # noqa: E402

try:  # optional reference for the 2D figures
    from torchvision.ops import roi_align as tv_roi_align
    from torchvision.ops import roi_pool as tv_roi_pool
except Exception:  # ImportError, or a torchvision built for another torch (its operators fail to load)
    tv_roi_align = tv_roi_pool = None


def make_rois(gen, k, batch, image_size, min_size, max_size, device):
    """``[k, 1 + 2d]`` RoIs ``(batch, lo.., hi..)`` inside the image, sizes uniform in [min, max]."""
    img = torch.tensor(image_size, dtype=torch.float32)
    d = len(image_size)
    size = min_size + torch.rand(k, d, generator=gen) * (max_size - min_size)
    lo = torch.rand(k, d, generator=gen) * (img - size).clamp(min=0)
    bidx = torch.randint(0, batch, (k, 1), generator=gen).float()
    return torch.cat([bidx, lo, lo + size], 1).to(device)


def to_xyxy(rois):
    """``(b, y0, x0, y1, x1)`` -> torchvision's ``(b, x0, y0, x1, y1)``."""
    return rois[:, [0, 2, 1, 4, 3]].contiguous()


def run_figure(name, ours, ref, ref_impl, feats, info, device, repeats):
    """Time ``ours(f)`` / ``ref(f)`` forward and forward + backward; print one JSON line per mode."""
    warmup = 3 if device.type == "cuda" else 1
    feats_g = feats.detach().clone().requires_grad_(True)
    with torch.no_grad():
        out = ours(feats)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        diff = None if ref is None else float((out - ref(feats)).abs().max())
    del out

    def fwd(op):
        def call():
            with torch.no_grad():
                return op(feats)

        return call

    def fwd_bwd(op):
        def call():
            feats_g.grad = None
            op(feats_g).backward(upstream)

        return call

    for mode, wrap in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        ms, _ = time_call(wrap(ours), device=device, repeats=repeats, warmup=warmup)
        ref_ms = None
        if ref is not None:
            ref_ms, _ = time_call(wrap(ref), device=device, repeats=repeats, warmup=warmup)
        line = {
            "bench": f"{name}_{mode}",
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "impl": "medetect",
            **info,
            "median_ms": round(ms, 3),
            "ref_impl": None if ref is None else ref_impl,
            "ref_median_ms": None if ref_ms is None else round(ref_ms, 3),
            "ratio": None if ref_ms is None else round(ref_ms / ms, 3),
            "ours_over_ref": None if ref_ms is None else round(ms / ref_ms, 3),
            "max_abs_diff": diff,
            "repeats": repeats,
        }
        print(json.dumps(line), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 GPU, 3 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    ap.add_argument("--full", action="store_true", help="also run the full-size 3D figure on the CPU (slow)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    gen = torch.Generator().manual_seed(0)

    # RoIAlign 2D vs torchvision
    feats = torch.randn(2, 256, 200, 272, generator=gen).to(device)
    rois = make_rois(gen, 1000, 2, (800, 1088), 16, 400, device)
    rois_tv = to_xyxy(rois)
    run_figure(
        "roi_align_2d",
        lambda f: roi_align(f, rois, 7, 0.25, 2, True),
        (lambda f: tv_roi_align(f, rois_tv, 7, 0.25, 2, True)) if tv_roi_align else None,
        "torchvision.ops.roi_align",
        feats,
        {"features": list(feats.shape), "rois": 1000, "output": [7, 7], "sampling_ratio": 2},
        device,
        repeats,
    )
    del feats

    # RoIAlign 3D (no reference)
    figures = [("roi_align_3d", (1, 128, 48, 128, 128), 500)]
    if device.type == "cpu":
        small = [("roi_align_3d_small", (1, 64, 24, 64, 64), 200)]
        figures = small + (figures if args.full else [])
    for name, shape, k in figures:
        feats3 = torch.randn(shape, generator=gen).to(device)
        rois3 = make_rois(gen, k, 1, tuple(2 * s for s in shape[2:]), 8, 64, device)
        run_figure(
            name,
            lambda f, r=rois3: roi_align(f, r, 7, 0.5, 2, True),
            None,
            None,
            feats3,
            {"features": list(shape), "rois": k, "output": [7, 7, 7], "sampling_ratio": 2},
            device,
            repeats,
        )
        del feats3

    # RoIPool 2D vs torchvision
    featsp = torch.randn(2, 64, 100, 136, generator=gen).to(device)
    roisp = make_rois(gen, 500, 2, (400, 544), 16, 400, device)
    roisp_tv = to_xyxy(roisp)
    run_figure(
        "roi_pool_2d",
        lambda f: roi_pool(f, roisp, 7, 0.25),
        (lambda f: tv_roi_pool(f, roisp_tv, 7, 0.25)) if tv_roi_pool else None,
        "torchvision.ops.roi_pool",
        featsp,
        {"features": list(featsp.shape), "rois": 500, "output": [7, 7], "sampling_ratio": None},
        device,
        repeats,
    )


if __name__ == "__main__":
    main()
