"""The files tollgate ships with: the price table and the model catalog
(`config/` in the repository links to them). Read through `path()`, so an installed wheel
finds them as a checkout does."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PRICES = "prices.yaml"
MODELS = "models.yaml"


def path(name: str) -> Path:
    return Path(str(files(__name__) / name))
