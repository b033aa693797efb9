"""The README and the docs site: the README stays short, its Python example runs, and the mkdocs site builds without
a warning (broken links and anchors included)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path



REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_short_and_names_the_set_up_commands():
    text = README.read_text(encoding="utf-8")
    assert len(README.read_bytes()) < 10_000
    assert "make demo" in text and "make test" in text
    for extra in ('".[dicom-sr]"', '".[lineage]"', '".[bench]"'):
        assert extra in text
    assert not re.search(r"\bissue\s*\d+", text, flags=re.I), "no issue numbers in the README"


def test_readme_command_table_lists_every_cli_command():
    from medetect.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = README.read_text(encoding="utf-8")
    table = {m for m in re.findall(r"^\| `medetect ([a-z-]+)", text, flags=re.M)}
    assert table == set(sub.choices)


def test_readme_python_example_runs():
    blocks = [b for b in _python_blocks(README.read_text(encoding="utf-8")) if "medetect.load_model" in b]
    assert len(blocks) == 1
    code = blocks[0]
    assert "np.asarray(Image.open(" in code  # the example shows a path AND a numpy array
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RBC" in out.stdout


def test_docs_have_no_issue_numbers():
    for page in sorted((REPO / "docs").glob("*.md")):
        hit = re.search(r"\bissues?\s*\d+", page.read_text(encoding="utf-8"), flags=re.I)
        assert hit is None, f"{page.name}: {hit.group(0) if hit else ''}"


def test_mkdocs_builds_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr
    for page in ("index.html", "guide/index.html", "tasks/index.html", "formats/index.html",
                 "architecture/index.html", "results/index.html", "models/index.html",
                 "config-reference/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
