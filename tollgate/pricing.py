"""The price table and cost arithmetic.

Prices are written in USD per 1M tokens, which is the same number as micro-dollars per token,
so a cost is an exact Decimal sum rounded up once to integer micro-dollars.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tollgate.config.fastyaml import read_data
from tollgate.config.problems import ConfigError, Problem
from tollgate.usage import STANDARD_TIERS, Usage

if TYPE_CHECKING:
    from tollgate.config.schema import Config

# Anthropic bills a prompt-cache write kept an hour at twice the input price.
CACHE_WRITE_1H_FACTOR = 2


class PriceOverride(BaseModel):
    """A tier's prices: the fields it sets replace the model's, the rest stay."""
    model_config = ConfigDict(extra="forbid")
    input: Decimal | None = Field(default=None, ge=0)
    output: Decimal | None = Field(default=None, ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)
    cache_write_1h: Decimal | None = Field(default=None, ge=0)


class LongContext(PriceOverride):
    """Prices for a request whose prompt (every input token, cached or not) is longer than
    `above_input_tokens`: they apply to the whole request, as the providers bill it."""
    above_input_tokens: int = Field(gt=0)


LONG_CONTEXT = "long_context"


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)  # kept 5 minutes
    cache_write_1h: Decimal | None = Field(default=None, ge=0)  # kept 1 hour
    # By the service tier the provider reports (flex, priority, ...): the standard tier
    # (`default`, `standard`) is the model's own price.
    tiers: dict[str, PriceOverride] = Field(default_factory=dict)
    long_context: LongContext | None = None
    # USD per 1,000 searches of the provider's web search tool (Anthropic's, OpenAI's
    # Responses'), on top of the tokens its results add to the input.
    web_search: Decimal | None = Field(default=None, ge=0)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, PriceOverride]) -> dict[str, PriceOverride]:
        for name in tiers:
            if name != name.lower() or name in STANDARD_TIERS:
                raise ValueError(f"tier {name!r}: name tiers in lower case as the provider "
                                 "reports them (flex, priority); the standard tier is the "
                                 "model's own price")
        return tiers

    def served(self, usage: Usage) -> tuple[ModelPrice, str | None]:
        """The price that applies to what was served, and its tier as the ledger names it
        (None: standard): the reported service tier's prices, then the long-context prices
        when the prompt was longer than their threshold. A tier with no price here is still
        named, and charged the standard price."""
        names: list[str] = []
        price = self
        if usage.service_tier and usage.service_tier not in STANDARD_TIERS:
            names.append(usage.service_tier)
            if usage.service_tier in self.tiers:
                price = price._with(self.tiers[usage.service_tier])
        lc = self.long_context
        if lc is not None and usage.prompt_tokens > lc.above_input_tokens:
            names.append(LONG_CONTEXT)
            price = price._with(lc)
        return price, "+".join(names) or None

    def _with(self, override: PriceOverride) -> ModelPrice:
        fields = override.model_dump(exclude_none=True, exclude={"above_input_tokens"})
        return self.model_copy(update=fields)


# What an unpriced model is charged (gateway.unpriced: allow): nothing, openly.
ZERO_PRICE = ModelPrice(input=Decimal(0), output=Decimal(0))


class PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = "USD"
    unit: str = "per_1m_tokens"
    models: dict[str, ModelPrice]


def cost_micros(usage: Usage, price: ModelPrice) -> int:
    """Integer micro-dollars, rounded up, at the price of the tier that served `usage`. A
    missing cache price falls back to the input price (an hour's write to twice that)."""
    price = price.served(usage)[0]
    cached = price.cached_input if price.cached_input is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    write_1h = price.cache_write_1h if price.cache_write_1h is not None else \
        price.input * CACHE_WRITE_1H_FACTOR
    micros = (usage.input_tokens * price.input + usage.cached_input_tokens * cached
              + usage.cache_write_tokens * write + usage.cache_write_1h_tokens * write_1h
              + usage.output_tokens * price.output)
    if usage.web_search_requests:
        micros += usage.web_search_requests * search_micros(price)
    return math.ceil(micros)  # prices are per 1M tokens == micro-dollars per token


def input_priced(tokens: int, price: ModelPrice) -> tuple[int, str | None]:
    """`cost_micros` of `tokens` uncached input tokens and nothing else, and the tier they are
    priced at: what a request surely costs before any answer (its written-ahead row)."""
    served, tier = price.served(Usage(input_tokens=tokens))
    return math.ceil(tokens * served.input), tier


def search_micros(price: ModelPrice) -> Decimal:
    """What one web search costs, in micro-dollars (the table's price is per 1,000); a model
    with no search price is charged none (the settlement warns)."""
    return price.web_search * 1000 if price.web_search is not None else Decimal(0)


def worst_case_micros(input_tokens: int, max_output_tokens: int, price: ModelPrice,
                      searches: int = 0) -> int:
    """What a request can cost at most: every input token uncached, every output token used,
    every web search it allows run (at `price` as given: the caller picks the tier it may be
    served at)."""
    micros = input_tokens * price.input + max_output_tokens * price.output
    if searches:
        micros += searches * search_micros(price)
    return math.ceil(micros)


@dataclass(frozen=True)
class PriceTable:
    models: dict[str, ModelPrice]
    path: Path | None = None
    # Dated snapshots the model catalog names, and their model: priced as it is. Any other
    # name (an invented date included) has no price.
    snapshots: dict[str, str] = field(default_factory=dict)

    def lookup(self, model: str, overrides: dict[str, ModelPrice] | None = None
               ) -> ModelPrice | None:
        """A provider's own price (`overrides`) first, then the table's: the exact name,
        then the model a catalogued snapshot is of."""
        base = self.snapshots.get(model)
        for table in (overrides or {}, self.models):
            if model in table:
                return table[model]
            if base is not None and base in table:
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
    if not path.exists():
        raise ConfigError([Problem(str(path), None, "", "price table not found")])
    try:
        parsed = PriceFile.model_validate(read_data(path) or {})
    except ValidationError as e:
        raise ConfigError([
            Problem(str(path), None, ".".join(str(p) for p in err["loc"]), err["msg"])
            for err in e.errors()
        ]) from None
    return PriceTable(models=parsed.models, path=path)
