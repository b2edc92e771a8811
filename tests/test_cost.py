"""Cost arithmetic (SPEC §12), table-driven: cache splits, rounding to the nano-dollar, unpriced
models; and the price and money-budget rules of the config file."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from proxy.config import ConfigError, Price
from proxy.configfile import parse_config
from proxy.cost import MAX_COST_NANO, cost_nano, usd

from .test_configfile import patched

# gpt-4o's list prices: 2.5 in, 1.25 cached in, 10 out (USD per million tokens), writes at input
GPT_4O = Price(input=2_500_000, output=10_000_000, cached_input=1_250_000, cache_write=2_500_000)
# Anthropic-like: writes dearer than input, reads a tenth of it
CLAUDE = Price(input=3_000_000, output=15_000_000, cached_input=300_000, cache_write=3_750_000)
# six decimals, the finest a price may have: 0.000001 USD per million tokens is 1 pico-dollar a token
TINY = Price(input=1, output=1, cached_input=1, cache_write=1)
# 0.0025 USD per million tokens: 2.5 nano-dollars a token
HALVES = Price(input=2_500, output=2_500, cached_input=2_500, cache_write=2_500)
# prices no token count divides evenly
ODD = Price(input=1_234_567, output=7_654_321, cached_input=123_457, cache_write=1_500_001)

# (price, prompt, cached, cache_write, completion) -> nano-dollars
COST_CASES = [
    ((GPT_4O, 1000, 0, 0, 500), 2_500_000 + 5_000_000),  # 1000 × 2.5 µ$ + 500 × 10 µ$ = 7.5 m$
    ((GPT_4O, 1000, 400, 0, 0), 600 * 2_500 + 400 * 1_250),  # cache reads at cached_input
    ((CLAUDE, 1000, 600, 300, 10), 100 * 3_000 + 600 * 300 + 300 * 3_750 + 10 * 15_000),
    ((GPT_4O, 0, 0, 0, 0), 0),
    ((GPT_4O, 1, 0, 0, 1), 2_500 + 10_000),
    ((HALVES, 1, 0, 0, 0), 3),  # 2.5 nano-dollars, rounded up: a counter never shows less than was spent
    ((HALVES, 2, 0, 0, 0), 5),
    ((TINY, 1, 0, 0, 0), 1),  # 1 pico-dollar still costs a nano-dollar
    ((TINY, 1000, 0, 0, 0), 1),  # 1000 pico-dollars: exactly one nano-dollar
    ((TINY, 1001, 0, 0, 0), 2),
    ((GPT_4O, 100, 500, 0, 0), 100 * 1_250),  # more cache reads than prompt tokens: capped at the prompt
    ((CLAUDE, 100, 60, 90, 0), 60 * 300 + 40 * 3_750),  # reads + writes over the prompt: writes capped
    ((CLAUDE, 100, -5, -5, 0), 100 * 3_000),  # negative cache figures count as none
    ((GPT_4O, 1 << 40, 0, 0, 1 << 40), MAX_COST_NANO),  # absurd figures stay within the clamp
]


@pytest.mark.parametrize(("args", "expected"), COST_CASES)
def test_cost(args: tuple[Price, int, int, int, int], expected: int) -> None:
    price, prompt, cached, cache_write, completion = args
    assert cost_nano(price, prompt=prompt, cached=cached, cache_write=cache_write, completion=completion) == expected


def test_the_sum_of_rounded_costs_is_within_a_nano_dollar_a_request_of_the_exact_sum() -> None:
    exact = Decimal(0)
    rounded = 0
    for prompt in range(1, 2001):
        cached, written, completion = prompt // 3, prompt // 5, prompt % 7
        rounded += cost_nano(ODD, prompt=prompt, cached=cached, cache_write=written, completion=completion)
        exact += (
            Decimal(prompt - cached - written) * Decimal("1.234567") + Decimal(cached) * Decimal("0.123457")
            + Decimal(written) * Decimal("1.500001") + Decimal(completion) * Decimal("7.654321")
        ) / 10**6
    error = Decimal(rounded) / 10**9 - exact
    assert 0 < error < Decimal(2000) / 10**9


@pytest.mark.parametrize("nano", [0, 1, 2_500, 123_456_789, 10**15 - 1])
def test_usd_text_is_the_exact_decimal(nano: int) -> None:
    """The access log's float prints as the counter's decimal, so summing the log's text is exact."""
    assert Decimal(repr(usd(nano))) == Decimal(nano) / 10**9
    assert usd(None) is None


def model_price(changes: dict[str, object]) -> Price | None:
    return parse_config(patched(changes), {}).models["gpt-4o"].price


def test_prices_read_as_pico_dollars_per_token_with_cache_prices_defaulting_to_input() -> None:
    assert model_price({"models.gpt-4o.price": {"input": 2.5, "output": 10}}) == Price(
        input=2_500_000, output=10_000_000, cached_input=2_500_000, cache_write=2_500_000
    )
    given = {"input": 3, "output": 15, "cached_input": 0.3, "cache_write": 3.75}
    assert model_price({"models.gpt-4o.price": given}) == CLAUDE
    assert model_price({"models.gpt-4o.price": {"input": 0.000001, "output": 0}}) == Price(1, 0, 1, 1)
    assert model_price({}) is None


PRICE_PROBLEMS: list[tuple[dict[str, Any], str]] = [
    ({"models.gpt-4o.price": {"output": 10}}, "models.gpt-4o.price.input: is required"),
    ({"models.gpt-4o.price": {"input": 1}}, "models.gpt-4o.price.output: is required"),
    ({"models.gpt-4o.price": {"input": -1, "output": 1}}, "models.gpt-4o.price.input: must be >= 0"),
    ({"models.gpt-4o.price": {"input": 1, "output": 1, "cache_write": -0.5}}, "models.gpt-4o.price.cache_write: must be >= 0"),
    ({"models.gpt-4o.price": {"input": 1, "output": "x"}}, "models.gpt-4o.price.output: must be a number"),
    ({"models.gpt-4o.price": {"input": 1, "output": 1, "cached": 1}}, "models.gpt-4o.price.cached: unknown key"),
    (
        {"models.gpt-4o.price": {"input": 0.0000001, "output": 1}},
        "models.gpt-4o.price.input: must have at most 6 decimal places (USD per million tokens)",
    ),
    ({"keys[0].budget_usd": 0}, "keys[0].budget_usd: must be > 0"),
    ({"keys[0].budget_period": "hourly"}, "keys[0].budget_period: must be one of total, daily, weekly, monthly"),
]


@pytest.mark.parametrize(("changes", "problem"), PRICE_PROBLEMS)
def test_price_and_budget_problems(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(patched(changes), {})
    assert problem in caught.value.problems


PRICED = {"input": 1, "output": 2}


def unpriced_problems(changes: dict[str, object]) -> list[str]:
    try:
        parse_config(patched(changes), {})
    except ConfigError as exc:
        return [p for p in exc.problems if "has no price" in p]
    return []


def test_a_money_budget_needs_every_model_the_key_reaches_priced_fallbacks_included() -> None:
    budget = {"keys[0].budget_usd": 100}
    # an unrestricted key reaches every model
    assert unpriced_problems(budget) == [
        "keys[0].budget_usd: model 'gpt-4o' has no price (models.gpt-4o.price); a money budget needs every model the key can reach priced",
        "keys[0].budget_usd: model 'gpt-4o-mini' has no price (models.gpt-4o-mini.price); a money budget needs every model the key can reach priced",
    ]
    # the key may ask for gpt-4o only, but gpt-4o falls back to the unpriced gpt-4o-mini
    fallback = {**budget, "keys[0].models": ["gpt-4o"], "models.gpt-4o.price": PRICED}
    assert [p.split(";")[0] for p in unpriced_problems(fallback)] == [
        "keys[0].budget_usd: model 'gpt-4o-mini' has no price (models.gpt-4o-mini.price)"
    ]
    every = {**fallback, "models.gpt-4o-mini.price": PRICED}
    key = parse_config(patched({**every, "keys[0].budget_period": "monthly"}), {}).keys[0]
    assert (key.budget_nano_usd, key.budget_period) == (100 * 10**9, "monthly")
    assert unpriced_problems({"keys[0].budget_tokens": 5}) == []  # a token budget needs no prices
    assert parse_config(patched({**every, "keys[0].budget_usd": 0.5}), {}).keys[0].budget_nano_usd == 500_000_000
