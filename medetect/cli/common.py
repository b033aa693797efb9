"""Argument types and checks shared by the sub-commands: each failure names the argument (exit code 2)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .errors import UsageError

__all__ = ["positive_int", "nonneg_int", "positive_float", "fraction", "add_runtime", "apply_runtime", "check_out_dir",
           "print_json"]


def _number(kind, text: str, what: str, ok) -> float | int:
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(v, float) and not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def positive_int(text: str) -> int:
    return _number(int, text, "a positive integer", lambda v: v > 0)


def nonneg_int(text: str) -> int:
    return _number(int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a number > 0", lambda v: v > 0)


def fraction(text: str) -> float:
    return _number(float, text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def probability(text: str) -> float:
    return _number(float, text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def add_runtime(sp: argparse.ArgumentParser, device: bool = True) -> None:
    """``--device`` and ``--threads``, the same on every command that computes."""
    if device:
        sp.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    sp.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")


def apply_runtime(args) -> None:
    """Set the thread count and check ``--device`` against this torch build before any work starts."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dev = getattr(args, "device", None)
    if dev is None:
        return
    try:
        d = torch.device(dev)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {dev!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise UsageError(f"--device {dev}: this torch ({torch.__version__}) has {build}; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {dev}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif d.type not in ("cpu", "mps"):
        raise UsageError(f"--device {dev}: only cpu, cuda and mps are supported")


def check_out_dir(path: str | Path, arg: str = "--out", *, force: bool | None = None) -> Path:
    """An output folder: may exist (as a folder), must not be a file. With ``force`` given (the command has a
    ``--force`` flag), a folder that already holds files is refused unless ``force`` is true: results are never
    replaced silently."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{arg} {p} is an existing file; give a folder (it is created if missing)")
    if force is False and p.is_dir() and any(p.iterdir()):
        raise UsageError(f"{arg} {p} already holds files (an earlier result?); choose a new folder, or pass --force "
                         "to write into it (files of the same name are replaced)")
    return p


def check_out_file(path: str | Path, arg: str = "--out", *, force: bool | None = None) -> Path:
    """An output file: must not be an existing folder; an existing file is replaced only with ``force`` (when the
    command has a ``--force`` flag)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{arg} {p} is a folder; give a file name")
    if force is False and p.exists():
        raise UsageError(f"{arg} {p} already exists; choose another name, or pass --force to replace it")
    return p


def add_force(sp: argparse.ArgumentParser, what: str = "the output") -> None:
    sp.add_argument("--force", action="store_true", help=f"replace {what} if it exists (default: refuse)")


def print_json(obj, **kw) -> None:
    """Strict JSON on stdout: NaN and infinities become null (other tools' parsers reject NaN)."""
    from ..engine.trainer import json_safe

    print(json.dumps(json_safe(obj), allow_nan=False, **kw), flush=True)
