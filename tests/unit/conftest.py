from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import ROOT


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A copy of the shipped example config and price table."""
    shutil.copy(ROOT / "config" / "gateway.yaml", tmp_path / "gateway.yaml")
    shutil.copy(ROOT / "config" / "prices.yaml", tmp_path / "prices.yaml")
    return tmp_path
