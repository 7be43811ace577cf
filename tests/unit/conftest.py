from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import ROOT

# Property tests check behaviour, not speed: a busy machine must not fail them.
settings.register_profile("tollgate", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tollgate")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A copy of the shipped example config and price table."""
    shutil.copy(ROOT / "config" / "gateway.example.yaml", tmp_path / "gateway.yaml")
    shutil.copy(ROOT / "config" / "prices.yaml", tmp_path / "prices.yaml")
    return tmp_path
