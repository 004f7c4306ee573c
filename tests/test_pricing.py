"""Price lookup (exact, then globs longest first) and exact integer nano-USD costs."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from meterproxy.metering.usage import Usage
from meterproxy.pricing import Price, PriceTable, nano_to_usd

TABLE = PriceTable({
    "gpt-5.4": Price.of(1.25, 10.0, cached_input=0.125),
    "openai/gpt-4o": Price.of("2.5", "10", cached_input="1.25"),
    "anthropic/*": Price.of(3.0, 15.0, cached_input=0.3),
    "anthropic/claude-opus*": Price.of(15, 75),
    "*": Price.of(0.001, 0.002),
})


def test_exact_before_glob_and_longest_glob_first() -> None:
    assert TABLE.lookup("gpt-5.4") == Price.of(1.25, 10.0, cached_input=0.125)
    assert TABLE.lookup("anthropic/claude-sonnet") == Price.of(3, 15, cached_input=0.3)
    assert TABLE.lookup("anthropic/claude-opus-4") == Price.of(15, 75)
    assert TABLE.lookup("something-else") == Price.of(0.001, 0.002)
    assert TABLE.lookup("gpt-5.4") is TABLE.lookup("gpt-5.4")  # memoised


def test_glob_is_case_sensitive_and_unpriced_is_none() -> None:
    table = PriceTable({"anthropic/*": Price.of(3, 15)})
    assert table.lookup("Anthropic/claude") is None
    assert table.lookup("gpt-4o") is None
    assert table.cost_nano("gpt-4o", Usage(100, 0, 100)) == (0, False)


def test_cached_input_defaults_to_input() -> None:
    p = Price.of(2, 8)
    assert p.cached_input == Decimal(2)
    assert Price.of(2.5, 8).input == Decimal("2.5")  # float via str, no binary noise


def test_exact_cost_values() -> None:
    # gpt-5.4: 1000 uncached * 1.25 + 200 cached * 0.125 + 300 * 10 (USD / 1M)
    # = (1250 + 25 + 3000) / 1e6 USD = 4275e-6 USD = 4_275_000 nano-USD
    assert TABLE.cost_nano("gpt-5.4", Usage(1200, 200, 300, 100)) == (4_275_000, True)
    assert TABLE.cost_nano("openai/gpt-4o", Usage(1, 0, 0)) == (2_500, True)
    # 0.001 and 0.002 USD per million tokens are 1 and 2 nano-USD per token
    assert TABLE.cost_nano("other", Usage(1, 0, 1)) == (3, True)


def test_reasoning_is_not_billed_twice() -> None:
    without = TABLE.cost_nano("gpt-5.4", Usage(10, 0, 500, 0))
    with_reasoning = TABLE.cost_nano("gpt-5.4", Usage(10, 0, 500, 400))
    assert with_reasoning == without == (10 * 1250 + 500 * 10_000, True)


def test_sub_nano_prices_round_half_even_once() -> None:
    table = PriceTable({"m": Price.of("0.0005", "0.0015")})  # 0.5 and 1.5 nano per token
    assert table.cost_nano("m", Usage(1, 0, 0)) == (0, True)   # 0.5 -> 0
    assert table.cost_nano("m", Usage(3, 0, 0)) == (2, True)   # 1.5 -> 2
    assert table.cost_nano("m", Usage(1, 0, 1)) == (2, True)   # 0.5 + 1.5 = 2, not 0 + 2
    assert table.cost_nano("m", Usage(0, 0, 1)) == (2, True)   # 1.5 -> 2


def test_nano_to_usd() -> None:
    assert nano_to_usd(4_275_000) == 0.004275
    assert nano_to_usd(0) == 0.0


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000),
                          st.integers(0, 10_000)), min_size=1, max_size=200))
def test_sum_of_many_small_costs_is_exact(rows: list[tuple[int, int, int]]) -> None:
    usages = [Usage(p + c, c, o) for p, c, o in rows]
    total = sum(TABLE.cost_nano("gpt-5.4", u)[0] for u in usages)
    whole = Usage(sum(u.prompt for u in usages), sum(u.cached_prompt for u in usages),
                  sum(u.completion for u in usages))
    assert total == TABLE.cost_nano("gpt-5.4", whole)[0]
    expected = sum(Decimal(p) * Decimal("1.25") + Decimal(c) * Decimal("0.125")
                   + Decimal(o) * 10 for p, c, o in rows) * 1000
    assert total == expected


def test_memo_is_bounded() -> None:
    table = PriceTable({"*": Price.of(1, 1)})
    for i in range(10_000):
        table.lookup(f"model-{i}")
    assert len(table._memo) <= 4096
