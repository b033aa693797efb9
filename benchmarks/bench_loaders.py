"""Data-loader throughput: can the loaders keep a GPU fed?

Prints one JSON line per figure with ``bench``, ``machine``, ``cpu_count``, ``workers``, ``items``, ``seconds``,
``items_per_s``, ``target``, ``meets_target`` (plus a few details per bench):

* ``bccd_train_scale1.0`` / ``bccd_train_scale0.5``: BCCD training images/s with the augmentation of
  ``configs/bccd_faster_rcnn.yaml`` (intensity jitter, random zoom 0.85..1.15, h/v flips, normalisation), at full
  resolution and at the configured half resolution, through a ``DataLoader`` (2 worker processes, batch 4,
  ``detection_collate``, image cache on, persistent workers as the Trainer uses them) over 2 epochs. Target: >= 200
  images/s. The time includes starting the workers and the first (cold) read of every JPEG, as a training run does.
* ``patches3d_128`` (+ ``patches3d_128_cold`` for the first epoch, which includes each worker reading the volume):
  128^3 patches/s from a CT-sized int16 MHD volume (default 256x512x512, written to a temp folder with a few
  nodule boxes) through :class:`~medetect.data.datasets.PatchDataset` with the positive-aware ``RandomCrop``
  (pos_prob 0.5) and random flips on all three axes, 2 workers, batch 2, persistent workers. Target: >= 50
  patches/s.

The BCCD figures use the data path as ``run_training`` sets it up: the fixed resize is the dataset's cached
``pre_transform`` and the cache is preloaded in the main process before the workers fork (included in the time).
``--compare`` adds the same figures for the pipelines as they were before these optimisations (suffixes ``_before``:
the fixed 0.5 resize redone on every sample and every worker decoding and caching each JPEG itself;
``_float_volume``: the whole volume held as float32 and cropped in float32), run in the same process for a fairer
before/after on a noisy machine.

Every figure also reports ``cpu_s`` (CPU seconds of the main process and its joined workers) and
``items_per_cpu_s``: on a shared machine the wall-clock rate mostly measures the other load, while
``items_per_cpu_s`` is roughly what one free core delivers (``workers * items_per_cpu_s`` bounds what the loader could
reach with that many free cores). ``load_avg_1min`` says how busy the machine was.

The BCCD figures need ``../shared/data/bccd`` (or ``--bccd-root``, or ``$MEDETECT_SHARED_DATA``); without it they print
a line with ``"skipped"``. ``--profile`` additionally times every transform step in the main process (ms per sample).

Usage: ``python benchmarks/bench_loaders.py [--only bccd|patches] [--epochs 2] [--volume 256 512 512] [--profile]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from medetect.config import load_config  # noqa: E402
from medetect.convert import Geometry  # noqa: E402
from medetect.data import transforms as T  # noqa: E402
from medetect.data.annotations import ImageAnnotation  # noqa: E402
from medetect.data.datasets import DetectionDataset, PatchDataset  # noqa: E402
from medetect.data.image import MedicalImage  # noqa: E402
from medetect.data.io import write_image  # noqa: E402
from medetect.engine.trainer import _EpochSampler, detection_collate  # noqa: E402
from medetect.detection.train import build_dataset, build_transform  # noqa: E402

CONFIG = REPO / "configs" / "bccd_faster_rcnn.yaml"
BCCD_TARGET = 200.0  # images/s
PATCH_TARGET = 50.0  # patches/s


def _machine() -> dict:
    return {"machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__}


def _emit(bench: str, *, workers: int, items: int, seconds: float, target: float, **extra) -> dict:
    rate = items / seconds if seconds > 0 else float("inf")
    row = {"bench": bench, **_machine(), "workers": workers, "items": items, "seconds": round(seconds, 3),
           "items_per_s": round(rate, 1), "target": target, "meets_target": bool(rate >= target), **extra}
    print(json.dumps(row), flush=True)
    return row


class _CPU:
    """CPU seconds used by this process and by its finished (joined) child processes, e.g. DataLoader workers.

    On a shared machine the wall-clock rate depends on what else runs; ``items / cpu_s`` does not (much): it is the
    rate one free core would give, so about ``workers * items_per_cpu_s`` is what the loader could reach with as many
    free cores as workers (an upper bound: it ignores waiting)."""

    def __init__(self):
        self.t0 = self._now()

    @staticmethod
    def _now() -> float:
        import resource

        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + c.ru_utime + c.ru_stime

    def stop(self) -> float:
        gc.collect()  # make sure the workers of a deleted loader are joined (their CPU time only counts then)
        return self._now() - self.t0


def _skip(bench: str, reason: str) -> None:
    print(json.dumps({"bench": bench, **_machine(), "skipped": reason}), flush=True)


def _bccd_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("MEDETECT_SHARED_DATA")
    return (Path(env) if env else REPO.parent / "shared" / "data") / "bccd"


def _time_steps(ds: DetectionDataset, n: int, passes: int = 2) -> dict:
    """ms per sample, in this process, of ``prepared_sample`` (read + float conversion + cached pre_transform: the
    first pass decodes, later passes hit the cache) and of each step of ``transform``."""
    steps = ds.transform.transforms if isinstance(ds.transform, T.Compose) else [ds.transform]
    acc = {"prepared_sample": 0.0}
    g = torch.Generator().manual_seed(0)
    for _ in range(passes):
        for i in range(n):
            t0 = time.perf_counter()
            s = ds.prepared_sample(i)
            acc["prepared_sample"] += time.perf_counter() - t0
            for k, t in enumerate(steps):
                t0 = time.perf_counter()
                s = t(s, g)
                name = f"{k}:{type(t).__name__}" + (f"({t.fn.__name__})" if hasattr(t, "fn") else "")
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
    return {k: round(1000 * v / (n * passes), 2) for k, v in acc.items()}


def _bccd_dataset(cfg, optimised: bool) -> DetectionDataset:
    ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    if not optimised:  # the pipeline before the pre_transform cache: the fixed resize runs on every access
        ds.pre_transform, ds.transform = None, build_transform(cfg.data, train=True)
    return ds


def bench_bccd(root: Path, scale: float, *, epochs: int, workers: int, batch: int, profile: bool,
               optimised: bool = True) -> None:
    """``optimised``: as ``run_training`` does it now (fixed resize cached as the dataset's pre_transform, cache
    preloaded in the main process before the workers fork); otherwise as before (resize on every sample, each worker
    decoding and caching every image itself). The time includes the preload."""
    bench = f"bccd_train_scale{scale}" + ("" if optimised else "_before")
    if not (root / "ImageSets" / "Main" / "train.txt").is_file():
        _skip(bench, f"BCCD not found at {root}")
        return
    cfg = load_config(CONFIG)
    cfg.data.root = str(root)
    cfg.data.scale = scale
    cfg.data.cache = True
    ds = _bccd_dataset(cfg, optimised)
    sampler = _EpochSampler(len(ds), seed=0)
    cpu = _CPU()
    t0 = time.perf_counter()
    if optimised and workers > 0:
        ds.preload()
    preload_s = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=detection_collate,
                        persistent_workers=workers > 0, drop_last=False)
    n, epoch_s = 0, []
    for e in range(epochs):
        sampler.set_epoch(e)
        te = time.perf_counter()
        for images, targets in loader:
            n += images.shape[0]
        epoch_s.append(round(time.perf_counter() - te, 3))
    seconds = time.perf_counter() - t0
    del loader
    cpu_s = cpu.stop()
    extra = {"batch_size": batch, "epochs": epochs, "preload_s": round(preload_s, 3), "epoch_seconds": epoch_s,
             "scale": scale,
             "last_batch_shape": list(images.shape), "cpu_s": round(cpu_s, 2),
             "items_per_cpu_s": round(n / cpu_s, 1), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if profile:
        extra["ms_per_sample_main_process"] = _time_steps(_bccd_dataset(cfg, optimised), 20)
    _emit(bench, workers=workers, items=n, seconds=seconds, target=BCCD_TARGET, **extra)


def _write_volume(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> tuple[Path, np.ndarray]:
    """A CT-like int16 volume (air, elliptic body of soft tissue, darker lungs, noise) and a few nodule boxes."""
    rng = np.random.default_rng(seed)
    dz, h, w = shape
    yy, xx = np.ogrid[:h, :w]
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.46 * w)) ** 2 <= 1
    lungs = (((yy - h / 2) / (0.3 * h)) ** 2 + ((np.abs(xx - w / 2) - 0.22 * w) / (0.16 * w)) ** 2) <= 1
    plane = np.full((h, w), -1000, np.int16)
    plane[body] = 40
    plane[lungs] = -850
    vol = np.broadcast_to(plane, shape).copy()
    vol += rng.integers(-20, 21, size=(1, h, w), dtype=np.int16)  # cheap texture (noise along z would cost seconds)
    boxes = []
    for _ in range(5):
        size = rng.integers(4, 24, size=3)
        lo = np.array([rng.integers(0, dz - size[0]), rng.integers(h // 4, 3 * h // 4 - size[1]),
                       rng.integers(w // 8, 7 * w // 8 - size[2])])
        vol[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]] = 60
        boxes.append(np.concatenate([lo, lo + size]).astype(float))
    geom = Geometry((1.25, 0.7, 0.7), (-180.0, -180.0, -300.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = folder / "ct.mhd"
    write_image(MedicalImage(vol[None], geom), path)
    return path, np.stack(boxes)


def bench_patches(shape: tuple[int, int, int], *, patch: int, epochs: int, patches_per_volume: int, workers: int,
                  batch: int, profile: bool, float_volume: bool = False) -> None:
    name = f"patches3d_{patch}" + ("_float_volume" if float_volume else "")
    with tempfile.TemporaryDirectory(prefix="medetect_bench_") as tmp:
        t0 = time.perf_counter()
        path, boxes = _write_volume(Path(tmp), shape)
        write_s = time.perf_counter() - t0
        rec = ImageAnnotation(path.name, boxes, ["nodule"] * len(boxes), image_shape=shape)
        base = DetectionDataset(records=[rec], root=tmp, classes=("nodule",), cache=False)
        # float_volume: an (empty) volume transform makes PatchDataset keep the whole volume as float32, which is
        # what it did before patches were cropped from the stored int16 volume and converted afterwards
        kw = dict(patch_size=(patch,) * 3, patches_per_volume=patches_per_volume, pos_prob=0.5,
                  transform=T.Compose([]) if float_volume else None)
        ds = PatchDataset(base, patch_transform=T.RandomFlip(axes=(0, 1, 2), p=0.5), **kw)
        cpu = _CPU()
        loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=detection_collate,
                            persistent_workers=workers > 0)
        n, pos, epoch_s, epoch_n = 0, 0, [], []
        for e in range(epochs):
            ds.set_epoch(e)
            te, ne = time.perf_counter(), 0
            for images, targets in loader:
                ne += images.shape[0]
                pos += sum(int(t["boxes"].shape[0] > 0) for t in targets)
            epoch_s.append(time.perf_counter() - te)
            epoch_n.append(ne)
            n += ne
        del loader
        cpu_s = cpu.stop()
        extra = {"batch_size": batch, "patch": [patch] * 3, "volume": list(shape), "volume_write_s": round(write_s, 2),
                 "epoch_seconds": [round(s, 3) for s in epoch_s], "positive_fraction": round(pos / max(n, 1), 3),
                 "cpu_s_all_epochs": round(cpu_s, 2), "items_per_cpu_s_all_epochs": round(n / cpu_s, 1),
                 "load_avg_1min": round(os.getloadavg()[0], 2)}
        if profile:
            p = PatchDataset(base, **kw)  # no patch transform: crop (+ conversion) only
            t1 = time.perf_counter()
            p._volume(0)
            load_ms = 1000 * (time.perf_counter() - t1)
            flip = T.RandomFlip(axes=(0, 1, 2), p=0.5)
            acc = {"crop": 0.0, "flip": 0.0}
            for i in range(20):
                g = torch.Generator().manual_seed(i)
                t1 = time.perf_counter()
                s = p[i % len(p)]
                acc["crop"] += time.perf_counter() - t1
                t1 = time.perf_counter()
                flip(s, g)
                acc["flip"] += time.perf_counter() - t1
            extra["ms_main_process"] = {"read_volume": round(load_ms, 1),
                                        **{k: round(50 * v, 2) for k, v in acc.items()}}
        if epochs > 1:
            _emit(f"{name}_cold", workers=workers, items=epoch_n[0], seconds=epoch_s[0], target=PATCH_TARGET,
                  note="first epoch: includes each worker reading the volume")
            _emit(name, workers=workers, items=sum(epoch_n[1:]), seconds=sum(epoch_s[1:]), target=PATCH_TARGET,
                  note="epochs after the first (volume cached in each worker)", **extra)
        else:
            _emit(name, workers=workers, items=n, seconds=sum(epoch_s), target=PATCH_TARGET, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("bccd", "patches"), default=None)
    ap.add_argument("--bccd-root", default=None)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--volume", type=int, nargs=3, default=[256, 512, 512])
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--patches-per-volume", type=int, default=128)
    ap.add_argument("--patch-epochs", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also time each transform step in the main process")
    ap.add_argument("--compare", action="store_true",
                    help="also run the pipelines as they were before the data-path optimisations (uncached resize, "
                         "float32 volume), interleaved with the current ones, for before/after figures")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the workers use one thread each; keep the main process from competing
    variants = (True, False) if args.compare else (True,)
    if args.only in (None, "bccd"):
        for s in args.scales:
            for v in variants:
                bench_bccd(_bccd_root(args.bccd_root), s, epochs=args.epochs, workers=args.workers,
                           batch=args.batch, profile=args.profile, optimised=v)
    if args.only in (None, "patches"):
        for v in variants:
            bench_patches(tuple(args.volume), patch=args.patch, epochs=args.patch_epochs,
                          patches_per_volume=args.patches_per_volume, workers=args.workers, batch=2,
                          profile=args.profile, float_volume=not v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
