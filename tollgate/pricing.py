"""The price table and cost arithmetic.

Prices are written in USD per 1M tokens, which is the same number as micro-dollars per token,
so a cost is an exact sum rounded up once to integer micro-dollars. Prices are read as
Decimal, and a cost is summed in integers over the price's rates as exact fractions
(`Rates`): the figure of the Decimal sum it replaced (which was exact up to Decimal's 28
digits), without Decimal's arithmetic on a request's path, where it cost some 30 µs a
request, cold.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
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

    @cached_property
    def rates(self) -> Rates:
        """This price's rates as exact fractions, worked out once (kept in the instance's
        `__dict__`, which pydantic leaves out of dumps and comparisons, and read from there
        at a plain attribute's cost: a private attribute costs a `__getattr__` call)."""
        return Rates.of(self)

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> ModelPrice:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("rates", None)  # its prices may differ: its rates are its own
        return copied

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
        (None: standard): see `at`."""
        return self.at(usage.prompt_tokens, usage.service_tier)

    def at(self, prompt_tokens: int, service_tier: str | None = None
           ) -> tuple[ModelPrice, str | None]:
        """The price of a request with `prompt_tokens` of input served at `service_tier`, and
        that tier as the ledger names it (None: standard): the tier's prices, then the
        long-context prices when the prompt is longer than their threshold. A tier with no
        price here is still named, and charged the standard price."""
        names: list[str] = []
        price = self
        if service_tier and service_tier not in STANDARD_TIERS:
            names.append(service_tier)
            if service_tier in self.tiers:
                price = price._with(self.tiers[service_tier])
        lc = self.long_context
        if lc is not None and prompt_tokens > lc.above_input_tokens:
            names.append(LONG_CONTEXT)
            price = price._with(lc)
        return price, "+".join(names) or None

    def _with(self, override: PriceOverride) -> ModelPrice:
        fields = override.model_dump(exclude_none=True, exclude={"above_input_tokens"})
        return self.model_copy(update=fields)


@dataclass(frozen=True, slots=True)
class Rates:
    """A price's micro-dollars per token of each kind, and per web search, as numerators
    over one common denominator: a cost is a sum of integer products, divided once."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    search: int
    denominator: int

    @classmethod
    def of(cls, price: ModelPrice) -> Rates:
        """A missing cache price is the input price (an hour's write twice that); a missing
        search price none (the settlement warns)."""
        kinds = [price.input, price.output,
                 price.cached_input if price.cached_input is not None else price.input,
                 price.cache_write if price.cache_write is not None else price.input,
                 price.cache_write_1h if price.cache_write_1h is not None else
                 price.input * CACHE_WRITE_1H_FACTOR,
                 search_micros(price)]
        ratios = [d.as_integer_ratio() for d in kinds]
        common = math.lcm(*(q for _, q in ratios))
        return cls(*(p * (common // q) for p, q in ratios), denominator=common)

    def micros(self, input_tokens: int = 0, output_tokens: int = 0,
               cached_input_tokens: int = 0, cache_write_tokens: int = 0,
               cache_write_1h_tokens: int = 0, searches: int = 0) -> int:
        """Their cost in micro-dollars, rounded up."""
        total = (input_tokens * self.input + output_tokens * self.output
                 + cached_input_tokens * self.cached_input
                 + cache_write_tokens * self.cache_write
                 + cache_write_1h_tokens * self.cache_write_1h + searches * self.search)
        return -(-total // self.denominator)


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
    return price.served(usage)[0].rates.micros(
        usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
        usage.cache_write_tokens, usage.cache_write_1h_tokens, usage.web_search_requests)


def input_priced(tokens: int, price: ModelPrice) -> tuple[int, str | None]:
    """`cost_micros` of `tokens` uncached input tokens and nothing else, and the tier they are
    priced at: what a request surely costs before any answer (its written-ahead row)."""
    served, tier = price.at(tokens)
    return served.rates.micros(tokens), tier


def search_micros(price: ModelPrice) -> Decimal:
    """What one web search costs, in micro-dollars (the table's price is per 1,000); a model
    with no search price is charged none (the settlement warns)."""
    return price.web_search * 1000 if price.web_search is not None else Decimal(0)


def worst_case_micros(input_tokens: int, max_output_tokens: int, price: ModelPrice,
                      searches: int = 0) -> int:
    """What a request can cost at most: every input token uncached, every output token used,
    every web search it allows run (at `price` as given: the caller picks the tier it may be
    served at)."""
    return price.rates.micros(input_tokens, max_output_tokens, searches=searches)


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
        problems: list[tuple[tuple[Any, ...], str]] = []
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
            for j, routed in enumerate(rp.targets()):
                for src, dst in routed.model_map.items():
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
