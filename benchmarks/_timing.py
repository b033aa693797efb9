"""Shared timing helper for the benchmarks: median wall time of repeated calls, with warm-up and CUDA sync.

Usage::

    from _timing import time_call
    ms, out = time_call(lambda: nms(boxes, scores, 0.5), device=boxes.device, repeats=10)

The benchmarks put their own folder on ``sys.path`` so that ``import _timing`` works however they are started.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["default_device", "synchronize", "time_call"]


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on ``device`` (no-op on CPU), so a timer measures finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device | str = "cpu", repeats: int = 10, warmup: int = 2) -> tuple[float, Any]:
    """Median milliseconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls; returns (ms, last output).

    Each timed call is bracketed by a device synchronisation so asynchronous CUDA work is counted in full.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = None
    for _ in range(max(0, warmup)):
        out = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out
