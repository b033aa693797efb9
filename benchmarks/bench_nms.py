"""Benchmark medetect.boxes.nms against the reference implementations, checking that the kept set is identical.

Prints one JSON line per figure with ``bench``, ``device``, ``impl``, ``n``, ``d``, ``iou_threshold``, ``kept``,
``median_ms``, ``ref_impl``, ``ref_median_ms``, ``ratio`` (= ref_median_ms / median_ms: our speed-up, > 1 means
medetect is faster), ``ours_over_ref`` (its inverse, the time ratio) and ``identical_kept`` (same kept indices in the
same order as the reference). Reference fields are null when the reference library is not importable.

Figures:

* 3D NMS of 5,000 boxes vs ``monai.data.box_utils.non_max_suppression`` (MONAI's NMS is a Python loop over the kept
  boxes, so it is timed with fewer repeats).
* 2D NMS of 1k, 2k, 5k, 10k boxes vs ``torchvision.ops.nms``.

Boxes are detector-like: clusters of jittered, overlapping boxes (sizes 10-60 voxels) around random centres, seeded.
Scores are distinct (a random permutation), because neither reference specifies an order for tied scores.

    python benchmarks/bench_nms.py [--device cpu|cuda] [--repeats 10] [--threads N]
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

from medetect.boxes import nms  # noqa: E402
from medetect.convert import reverse_axes  # noqa: E402


def clustered_boxes(n: int, d: int, *, extent: float, seed: int, per_cluster: int = 25):
    """``n`` boxes ``[n, 2d]`` (array order) in ``[0, extent)^d``: about ``per_cluster`` jittered boxes per object."""
    gen = torch.Generator().manual_seed(seed)
    k = max(1, n // per_cluster)
    centres = torch.rand(k, d, generator=gen) * extent
    size = 10 + torch.rand(k, d, generator=gen) * 50  # object sizes 10-60
    which = torch.randint(0, k, (n,), generator=gen)
    s = (size[which] * (0.8 + 0.4 * torch.rand(n, d, generator=gen))).clamp(10, 60)
    c = centres[which] + (torch.rand(n, d, generator=gen) - 0.5) * 0.4 * size[which]
    boxes = torch.cat([c - s / 2, c + s / 2], dim=-1)
    scores = (torch.randperm(n, generator=gen).float() + 1) / n  # distinct
    return boxes, scores


def _record(device, n, d, thr, ms, keep, ref_impl=None, ref_ms=None, ref_keep=None):
    identical = None if ref_keep is None else bool(torch.equal(keep.cpu(), ref_keep.cpu().to(torch.long)))
    return {
        "bench": "nms",
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "impl": "medetect",
        "n": n,
        "d": d,
        "iou_threshold": thr,
        "kept": int(keep.numel()),
        "median_ms": round(ms, 4),
        "ref_impl": ref_impl,
        "ref_median_ms": None if ref_ms is None else round(ref_ms, 4),
        "ratio": None if ref_ms is None else round(ref_ms / ms, 4),
        "ours_over_ref": None if ref_ms is None else round(ms / ref_ms, 4),
        "identical_kept": identical,
    }


def bench_3d_monai(device, repeats: int, n: int = 5000, thr: float = 0.5):
    boxes, scores = clustered_boxes(n, 3, extent=256.0, seed=3)
    boxes, scores = boxes.to(device), scores.to(device)
    ms, keep = time_call(lambda: nms(boxes, scores, thr), device=device, repeats=repeats)
    try:
        from monai.data.box_utils import non_max_suppression
    except ImportError:
        return _record(device, n, 3, thr, ms, keep)
    xyz = reverse_axes(boxes)  # MONAI xyzxyz is ITK order: the reverse of our array order
    ref_ms, ref_keep = time_call(
        lambda: non_max_suppression(xyz, scores, thr), device=device, repeats=max(1, repeats // 5), warmup=1
    )
    return _record(device, n, 3, thr, ms, keep, "monai.data.box_utils.non_max_suppression", ref_ms, ref_keep)


def bench_2d_torchvision(device, repeats: int, n: int, thr: float = 0.5, whole_image_box: bool = False):
    boxes, scores = clustered_boxes(n, 2, extent=1024.0, seed=n)
    if whole_image_box:  # one detection covering the whole image: its band is all N boxes
        boxes[0] = torch.tensor([0.0, 0.0, 1024.0, 1024.0])
    boxes, scores = boxes.to(device), scores.to(device)
    ms, keep = time_call(lambda: nms(boxes, scores, thr), device=device, repeats=repeats)
    try:
        from torchvision.ops import nms as tv_nms

        xyxy = reverse_axes(boxes)
        tv_nms(xyxy[:2], scores[:2], thr)  # the op may import but fail to load on this device
    except Exception:  # noqa: BLE001 - torchvision is optional
        return _record(device, n, 2, thr, ms, keep)
    ref_ms, ref_keep = time_call(lambda: tv_nms(xyxy, scores, thr), device=device, repeats=repeats)
    return _record(device, n, 2, thr, ms, keep, "torchvision.ops.nms", ref_ms, ref_keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per figure (MONAI: repeats // 5)")
    ap.add_argument("--sizes-2d", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    ap.add_argument("--n-3d", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(json.dumps(bench_3d_monai(device, args.repeats, n=args.n_3d)), flush=True)
    for n in args.sizes_2d:
        print(json.dumps(bench_2d_torchvision(device, args.repeats, n)), flush=True)
    # IoU threshold 0 (any overlap suppresses) with one whole-image box: the band path, not the dense N^2 triangle,
    # must stay in charge
    print(json.dumps(bench_2d_torchvision(device, args.repeats, max(args.sizes_2d), thr=0.0, whole_image_box=True)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
