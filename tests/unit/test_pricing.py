"""Prices by what was served: service tiers, hour-long cache writes, long context."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.config.problems import ConfigError
from tollgate.pricing import (
    ModelPrice,
    cost_micros,
    input_priced,
    load_prices,
    worst_case_micros,
)
from tollgate.usage import Usage, anthropic_usage

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


@pytest.mark.parametrize("tokens", [0, 1, 7, 999, 1000, 1001, 123_457])
@pytest.mark.parametrize("price", [PRICE, ModelPrice.model_validate(
    {"input": "0.15", "output": "0.6"})], ids=["long context", "plain"])
def test_input_alone_is_priced_as_cost_micros_prices_it(price, tokens):
    """A written-ahead row's charge: the input estimate, across the long-context line."""
    used = Usage(input_tokens=tokens)
    assert input_priced(tokens, price) == (cost_micros(used, price), price.served(used)[1])


PRICES = st.decimals(min_value=0, max_value=1000, places=7)
TOKENS = st.integers(min_value=0, max_value=10**8)


@given(input=PRICES, output=PRICES, cached=st.none() | PRICES, write=st.none() | PRICES,
       write_1h=st.none() | PRICES, search=st.none() | PRICES,
       counts=st.tuples(TOKENS, TOKENS, TOKENS, TOKENS, TOKENS, st.integers(0, 1000)))
def test_a_cost_is_the_exact_decimal_sum_of_its_prices_rounded_up_once(
        input, output, cached, write, write_1h, search, counts):
    price = ModelPrice(input=input, output=output, cached_input=cached, cache_write=write,
                       cache_write_1h=write_1h, web_search=search)
    n_in, n_out, n_cached, n_write, n_1h, searches = counts
    with localcontext() as exact:
        exact.prec = 100
        total = (n_in * input + n_out * output + n_cached * (input if cached is None else cached)
                 + n_write * (input if write is None else write)
                 + n_1h * (2 * input if write_1h is None else write_1h)
                 + searches * (0 if search is None else search * 1000))
        expected = math.ceil(total)
    used = Usage(input_tokens=n_in, output_tokens=n_out, cached_input_tokens=n_cached,
                 cache_write_tokens=n_write, cache_write_1h_tokens=n_1h,
                 web_search_requests=searches)
    assert cost_micros(used, price) == expected
    with localcontext() as exact:
        exact.prec = 100
        worst = math.ceil(n_in * input + n_out * output
                          + searches * (0 if search is None else search * 1000))
    assert worst_case_micros(n_in, n_out, price, searches) == worst


def test_a_copy_with_other_prices_is_charged_its_own():
    """(Each price works its rates out once: a copy made after that has its own.)"""
    assert cost_micros(Usage(input_tokens=10), PRICE) == 30
    dearer = PRICE.model_copy(update={"input": Decimal(7)})
    assert cost_micros(Usage(input_tokens=10), dearer) == 70
    assert cost_micros(Usage(input_tokens=10), PRICE) == 30


def test_a_standard_tier_is_the_models_price_and_an_unlisted_one_is_named():
    assert PRICE.served(Usage(input_tokens=5, service_tier="default")) == (PRICE, None)
    price, tier = PRICE.served(Usage(input_tokens=5, service_tier="flex"))
    assert (price, tier) == (PRICE, "flex")


def test_web_searches_cost_their_price_per_thousand_on_any_tier_and_none_unpriced():
    searching = PRICE.model_copy(update={"web_search": Decimal("10.00")})
    used = Usage(input_tokens=100, output_tokens=10, web_search_requests=3,
                 service_tier="priority")
    assert cost_micros(used, searching) == 100 * 5 + 10 * 25 + 3 * 10_000
    assert cost_micros(used, PRICE) == 100 * 5 + 10 * 25  # no search price: the tokens


def test_anthropic_usage_counts_web_searches_as_a_stream_totals_them():
    """message_start says none yet, message_delta gives the running total."""
    used = anthropic_usage({"input_tokens": 50, "output_tokens": 1,
                            "server_tool_use": {"web_search_requests": 0}})
    anthropic_usage({"output_tokens": 40, "server_tool_use": {"web_search_requests": 2}},
                    into=used)
    anthropic_usage({"output_tokens": 45}, into=used)  # a total without it keeps the count
    assert (used.input_tokens, used.output_tokens, used.web_search_requests) == (50, 45, 2)


def test_the_price_table_refuses_a_tier_named_for_the_standard_one(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  m: {input: 1, output: 2, tiers: {default: {input: 1}}}\n")
    with pytest.raises(ConfigError) as err:
        load_prices(path)
    assert "the standard tier is the model's own price" in str(err.value)
