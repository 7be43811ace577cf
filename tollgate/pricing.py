"""The price table and cost arithmetic.

Prices are written in USD per 1M tokens, which is the same number as micro-dollars per token,
so a cost is an exact Decimal sum rounded up once to integer micro-dollars.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tollgate.config.problems import ConfigError, Problem
from tollgate.usage import Usage

if TYPE_CHECKING:
    from tollgate.config.schema import Config

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def undated(model: str) -> str:
    """The model without a dated snapshot suffix (gpt-4o-2024-08-06 -> gpt-4o)."""
    return _DATE_SUFFIX.sub("", model)


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)


# What an unpriced model is charged (gateway.unpriced: allow): nothing, openly.
ZERO_PRICE = ModelPrice(input=Decimal(0), output=Decimal(0))


class PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = "USD"
    unit: str = "per_1m_tokens"
    models: dict[str, ModelPrice]


def cost_micros(usage: Usage, price: ModelPrice) -> int:
    """Integer micro-dollars, rounded up; a missing cache price falls back to the input price."""
    cached = price.cached_input if price.cached_input is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    micros = (usage.input_tokens * price.input + usage.cached_input_tokens * cached
              + usage.cache_write_tokens * write + usage.output_tokens * price.output)
    return math.ceil(micros)  # prices are per 1M tokens == micro-dollars per token


def worst_case_micros(input_tokens: int, max_output_tokens: int, price: ModelPrice) -> int:
    """What a request can cost at most: every input token uncached, every output token used."""
    return cost_micros(Usage(input_tokens=input_tokens, output_tokens=max_output_tokens), price)


@dataclass(frozen=True)
class PriceTable:
    models: dict[str, ModelPrice]
    path: Path | None = None

    def lookup(self, model: str, overrides: dict[str, ModelPrice] | None = None
               ) -> ModelPrice | None:
        """A provider's own price (`overrides`) first, then the table's: exact name first,
        then the name without a dated snapshot suffix."""
        base = undated(model)
        for table in (overrides or {}, self.models):
            if model in table:
                return table[model]
            if base in table:
                return table[base]
        return None

    def names(self) -> list[str]:
        return sorted(self.models)

    def check_config(self, cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
        """Every concrete model a key can be sent to must have a price."""
        problems = []
        for i, vk in enumerate(cfg.virtual_keys):
            for alias, target in vk.config.model_aliases.items():
                if self.lookup(target) is None:
                    problems.append(((("virtual_keys", i, "config", "model_aliases", alias)),
                                     f"model {target!r} has no price in the price table"))
            for j, pattern in enumerate(vk.models_allowed or []):
                if not _is_glob(pattern) and self.lookup(pattern) is None:
                    problems.append(((("virtual_keys", i, "models_allowed", j)),
                                     f"model {pattern!r} has no price in the price table"))
        for i, rp in enumerate(cfg.routing_policies):
            for j, target in enumerate(rp.targets()):
                for src, dst in target.model_map.items():
                    if self.lookup(dst) is None:
                        problems.append(((("routing_policies", i, "model_providers", j,
                                           "model_map", src)),
                                         f"model {dst!r} has no price in the price table"))
        return problems

    def matching(self, patterns: list[str]) -> list[str]:
        return [m for m in self.names() if any(fnmatch.fnmatchcase(m, p) for p in patterns)]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def load_prices(path: Path) -> PriceTable:
    try:
        with path.open(encoding="utf-8") as f:
            raw = YAML(typ="safe").load(f)
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), None, "", "price table not found")]) from None
    except YAMLError as e:
        raise ConfigError([Problem(str(path), None, "", f"YAML syntax: {e}")]) from None
    try:
        parsed = PriceFile.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError([
            Problem(str(path), None, ".".join(str(p) for p in err["loc"]), err["msg"])
            for err in e.errors()
        ]) from None
    return PriceTable(models=parsed.models, path=path)
