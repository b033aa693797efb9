"""``medetect`` command line: every parser lives in this package, and every command runs through one error handler
(:mod:`medetect.cli.errors`): a user mistake is one sentence on stderr with exit code 2, a traceback only with
``--debug``. Library modules have no argparse.

Commands: ``train``, ``export``, ``predict``, ``evaluate``, ``froc``, ``phantoms``, ``luna`` (stage one),
``luna-fpr`` (stage two), ``demo``, ``convert``, ``plan``, ``lineage`` (train, evaluate, proposals).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from . import data, detection, lineage, luna, tools
from .errors import run_guarded

__all__ = ["main", "build_parser"]

_MODULES = (detection, luna, tools, data, lineage)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medetect", description="Object detection for medical images, 2D and 3D.",
        epilog="Add --debug anywhere to see the full traceback of an error.")
    from .. import __version__

    p.add_argument("--version", action="version", version=f"medetect {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-sentence errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for m in _MODULES:
        m.register(sub)
    return p


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line are one plain line each (no source file, no code line)."""
    return f"medetect: warning: {message}\n"


def _is_flag(token: str, flag: str) -> bool:
    """``token`` is ``flag`` as argparse accepted it: whole, or a prefix of it (argparse's abbreviations)."""
    return token.startswith("--") and len(token) > 2 and flag.startswith(token)


def resume_command(args: argparse.Namespace, argv: list[str]) -> str | None:
    """For a command that trains into a run folder (``train``, ``luna train``, ``luna-fpr train``, ``lineage
    train``): the command line that resumes it, the user's own arguments with ``--resume`` instead of
    ``--overwrite`` (and the default ``--run-dir`` of ``train`` written out); None for other commands."""
    if not (args.cmd == "train" or args.cmd in ("luna", "luna-fpr", "lineage") and getattr(args, "sub", None) == "train"):
        return None
    words = [t for t in argv if not (_is_flag(t, "--resume") or _is_flag(t, "--overwrite"))]
    if args.cmd == "train" and args.run_dir is None:  # the folder cmd_train picks
        words += ["--run-dir", str(Path("runs") / Path(args.config).stem)]
    return shlex.join(["medetect", *words, "--resume"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the command
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    prog = f"medetect {args.cmd}" + (f" {args.sub}" if getattr(args, "sub", None) else "")
    return run_guarded(lambda: args.fn(args), prog, debug=debug, resume=resume_command(args, argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
