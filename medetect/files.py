"""The one atomic file writer of the library (and the one reader of its JSON records, :func:`read_json`): every file medetect writes that a reader (or a resumed run) must never
see half-written goes through :func:`write_atomically` (model files, checkpoints' JSON, run records, reports).

A temporary file is made beside the target (same folder, so the final rename stays on one file system), written,
flushed to disk, given its mode and renamed onto the target with ``os.replace`` (atomic on POSIX and Windows). A write
that fails removes its temporary file and leaves the target as it was."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically", "write_text_atomically", "read_json"]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then give it ``mode`` and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the rename makes them visible
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` through :func:`write_atomically`."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike, then: str = ""):
    """The JSON record at ``path``; damaged JSON is one sentence naming the file (and ``then``, what to do)."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})" + (f"; {then}" if then else "")) from None
