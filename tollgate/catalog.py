"""The model catalog (`models.yaml`): which vendor makes a model, the name some provider
types use for it, and the model of each other vendor to serve in its place when a routing
policy falls back across vendors without a model map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tollgate import shipped
from tollgate.config.fastyaml import read_data
from tollgate.config.problems import ConfigError, Problem

# The catalog tollgate ships, used when a config has no models.yaml of its own.
SHIPPED = shipped.path(shipped.MODELS)


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vendor: str
    # The most output tokens one answer can have: what a request with no cap of its own
    # can cost, and so what budgets and TPM limits reserve for it.
    max_output_tokens: int | None = Field(default=None, ge=0)
    ids: dict[str, str] = {}  # provider type -> its name for the model
    snapshots: list[str] = []  # the provider's dated names for it, priced as it is
    equivalents: dict[str, str] = {}  # other vendor -> its model for the same job


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, CatalogEntry] = {}


@dataclass(frozen=True)
class ModelCatalog:
    models: dict[str, CatalogEntry]
    path: Path | None = None

    def equivalent(self, model: str, vendor: str | None) -> str | None:
        """`vendor`'s model for the job `model` does (itself, when `vendor` makes it)."""
        entry = self.models.get(model)
        if entry is None or vendor is None:
            return None
        return model if entry.vendor == vendor else entry.equivalents.get(vendor)

    def named(self, model: str, provider_type: str) -> str:
        """The name `provider_type` uses for `model` (Bedrock and Vertex spell it their way)."""
        entry = self.models.get(model)
        return entry.ids.get(provider_type, model) if entry else model

    def max_output_tokens(self, model: str) -> int | None:
        """The model's output ceiling (a dated snapshot has its base model's)."""
        entry = self.models.get(model) or self.models.get(self.snapshots().get(model, ""))
        return entry.max_output_tokens if entry else None

    def snapshots(self) -> dict[str, str]:
        """Each dated snapshot the catalog names, and its model."""
        return {s: name for name, e in self.models.items() for s in e.snapshots}

    def referenced(self) -> set[str]:
        return {m for e in self.models.values() for m in e.equivalents.values()}


def load_catalog(path: Path) -> ModelCatalog:
    """The catalog at `path`, or the shipped one when there is no file there."""
    where = path if path.exists() else SHIPPED
    if not where.exists():
        return ModelCatalog({})
    try:
        parsed = CatalogFile.model_validate(read_data(where) or {})
    except ValidationError as e:
        raise ConfigError([
            Problem(str(where), None, ".".join(str(p) for p in err["loc"]), err["msg"])
            for err in e.errors()]) from None
    return ModelCatalog(parsed.models, where)
