"""Prices by what was served: service tiers, hour-long cache writes, long context."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tollgate.config.problems import ConfigError
from tollgate.pricing import ModelPrice, cost_micros, load_prices
from tollgate.usage import Usage

PRICE = ModelPrice.model_validate({
    "input": 3, "output": 15, "cached_input": "0.3", "cache_write": "3.75",
    "tiers": {"priority": {"input": 5, "output": 25}},
    "long_context": {"above_input_tokens": 1000, "input": 6, "output": "22.5"}})


def test_a_tier_replaces_only_the_prices_it_sets():
    price, tier = PRICE.served(Usage(input_tokens=10, service_tier="priority"))
    assert tier == "priority"
    assert (price.input, price.output, price.cached_input) == (5, 25, Decimal("0.3"))


def test_long_context_counts_every_prompt_token_and_stacks_on_the_tier():
    under = Usage(input_tokens=400, cached_input_tokens=300, cache_write_tokens=300)
    assert PRICE.served(under)[1] is None  # exactly 1000: not above
    over = Usage(input_tokens=400, cached_input_tokens=300, cache_write_1h_tokens=301,
                 output_tokens=10, service_tier="priority")
    price, tier = PRICE.served(over)
    assert tier == "priority+long_context" and (price.input, price.output) == (6, 22.5)
    # Cache reads keep the model's 0.3 (neither override sets one); the hour's writes, priced
    # nowhere, cost twice the long-context input.
    assert cost_micros(over, PRICE) == 400 * 6 + 300 * Decimal("0.3") + 301 * 12 + 225


def test_a_standard_tier_is_the_models_price_and_an_unlisted_one_is_named():
    assert PRICE.served(Usage(input_tokens=5, service_tier="default")) == (PRICE, None)
    price, tier = PRICE.served(Usage(input_tokens=5, service_tier="flex"))
    assert (price, tier) == (PRICE, "flex")


def test_the_price_table_refuses_a_tier_named_for_the_standard_one(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  m: {input: 1, output: 2, tiers: {default: {input: 1}}}\n")
    with pytest.raises(ConfigError) as err:
        load_prices(path)
    assert "the standard tier is the model's own price" in str(err.value)
