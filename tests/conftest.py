"""Shared test fixtures.

Tests that need the real datasets take the ``shared_data`` fixture: it points at ``../shared/data`` (or
``$MEDETECT_SHARED_DATA``) and skips the test on machines that do not have it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    env = os.environ.get("MEDETECT_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _shared_root()
    if not root.is_dir():
        pytest.skip(f"real datasets not present at {root}")
    return root
