"""``medetect`` command line: every parser lives in this package, and every command runs through one error handler
(:mod:`medetect.cli.errors`): a user mistake is one sentence on stderr with exit code 2, a traceback only with
``--debug``. Library modules have no argparse.

Commands: ``train``, ``export``, ``predict``, ``evaluate``, ``froc``, ``phantoms``, ``luna`` (stage one),
``luna-fpr`` (stage two), ``demo``, ``convert``, ``plan``, ``lineage`` (train, evaluate, proposals).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import data, detection, lineage, luna, tools
from .errors import run_guarded

__all__ = ["main", "build_parser"]

_MODULES = (detection, luna, tools, data, lineage)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medetect", description="Object detection for medical images, 2D and 3D.",
        epilog="Add --debug anywhere to see the full traceback of an error.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-sentence errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for m in _MODULES:
        m.register(sub)
    return p


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line are one plain line each (no source file, no code line)."""
    return f"medetect: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the command
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    prog = f"medetect {args.cmd}" + (f" {args.sub}" if getattr(args, "sub", None) else "")
    return run_guarded(lambda: args.fn(args), prog, debug=debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
