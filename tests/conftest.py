"""Shared test fixtures: the real data folder ``../shared/data`` (or ``$MEDSEG_DATA``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))


def data_path(rel: str) -> Path:
    """Path of a file in the shared data folder; skips the test when it is absent."""
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"real test data {rel} not found under {DATA} (set MEDSEG_DATA)")
    return p


@pytest.fixture
def data_dir() -> Path:
    # the data folder is the one with its README.md (an empty folder is not the data)
    if not (DATA / "README.md").is_file():
        pytest.skip(f"real test data folder {DATA} not found (set MEDSEG_DATA)")
    return DATA
