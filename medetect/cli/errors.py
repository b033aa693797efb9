"""The one error handler of the command line: every user mistake becomes one sentence on stderr and exit code 2.

Library code raises ordinary exceptions whose message is already one sentence naming the file, row, argument or
config key (``ValueError``, ``FileNotFoundError``, ...). Here they are mapped to ``medetect CMD: error: ...`` and exit
code 2; ``--debug`` (or ``MEDETECT_DEBUG=1``) re-raises instead, with the traceback. An exception that is not a
user error (a bug) is reported as one line naming its type, exit code 1, and the hint to rerun with ``--debug``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

__all__ = ["UsageError", "run_guarded", "user_message"]

EXIT_USER = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A wrong command-line value detected by the CLI itself (the message names the argument)."""


def _first_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text or "(no message)"


def user_message(exc: BaseException) -> str | None:
    """The one sentence for a user-caused exception, or None if ``exc`` is not one (a bug)."""
    import torch

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = ()  # type: ignore[assignment]
    if isinstance(exc, BrokenPipeError):
        return "the output pipe was closed before everything was written"
    if isinstance(exc, torch.OutOfMemoryError):
        return ("out of memory on the accelerator: use a smaller batch, patch or tile size "
                f"({_first_line(exc).split('. ')[0]})")
    if isinstance(exc, MemoryError):
        return "out of memory: use a smaller batch, patch or tile size, or fewer threads/workers"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"no space left on the device{where}; nothing already saved was changed: free space and rerun"
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        if exc.filename and exc.strerror and str(exc.filename) not in str(exc.args[0] if exc.args else ""):
            return f"{exc.filename}: {exc.strerror.lower()}"
        return _first_line(exc)
    if isinstance(exc, SafetensorError):
        return f"not a valid safetensors file ({_first_line(exc)}); pickled checkpoints are never loaded"
    if isinstance(exc, (ValueError, KeyError)) or type(exc).__name__ in ("TrainingDiverged", "TrainingOutOfMemory",
                                                                         "FROCError", "FROCInputError"):
        return _first_line(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    if isinstance(exc, OSError):
        name = f"{exc.filename}: " if exc.filename else ""
        return f"{name}{(exc.strerror or _first_line(exc)).lower()}"
    return None


def run_guarded(fn: Callable[[], int], prog: str, debug: bool = False, resume: str | None = None) -> int:
    """Run ``fn`` and map exceptions to one sentence + exit code (see the module docstring). Ctrl-C is one line and
    exit code 130; ``resume`` (a training command's resuming command line) is named in it."""
    debug = debug or os.environ.get("MEDETECT_DEBUG", "") not in ("", "0")
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted" + (f"; resume with: {resume}" if resume else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place that turns exceptions into exit codes
        if debug:
            raise
        if isinstance(exc, BrokenPipeError):
            # stdout is gone (``medetect froc ... | head``): silence the interpreter's own flush error at exit.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        msg = user_message(exc)
        if msg is None:
            print(f"{prog}: internal error: {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the "
                  "traceback, and please report it)", file=sys.stderr)
            return EXIT_BUG
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USER
