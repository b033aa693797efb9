"""Run every ``benchmarks/bench_*.py`` in its own subprocess (same interpreter) and print their JSON lines.

    python benchmarks/run_all.py [--only SUBSTRING ...]

Each benchmark's stdout (one JSON object per line) is passed through; its stderr goes to stderr. A benchmark that
fails gets a JSON line ``{"bench": <file>, "error": ...}`` and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="run only the benchmarks whose file name contains one of these")
    args = ap.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(o in s.name for o in args.only)]
    failed = 0
    for script in scripts:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:  # stream the lines as they come
            sys.stdout.write(line)
            sys.stdout.flush()
        rc = proc.wait()
        if rc != 0:
            failed += 1
            print(json.dumps({"bench": script.stem, "error": f"exit status {rc}"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
