"""Model prices and exact integer cost (docs/configuration.md "pricing").

Costs are integers in nano-USD (1e-9 USD) so that ledgers and counters add them up
exactly. A price per million tokens p is p * 1000 nano-USD per token, an integer for
every price with at most 3 decimals; such costs are computed with ints alone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import TypeVar

from meterproxy.metering.usage import Usage

_NANO_PER_MILLION = Decimal(1000)  # 1e9 nano-USD per USD / 1e6 tokens per million
_CTX = Context(prec=60)            # wide enough that only the final rounding rounds
_GLOB_CHARS = frozenset("*?[")
_MEMO_MAX = 4096
_P = TypeVar("_P")   # Price or _Rates: both tiered by prompt size


def _dec(v: Decimal | float | int | str) -> Decimal:
    # Floats go through str() so 2.5 means Decimal("2.5"), not its binary neighbour.
    return v if isinstance(v, Decimal) else Decimal(str(v))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Reasoning tokens are output tokens (billed as output).

    `tiers`: (threshold, price) pairs, ascending; when a request's prompt exceeds a threshold,
    the price of the highest such tier applies to the whole request (long-context pricing).
    """

    input: Decimal
    cached_input: Decimal
    output: Decimal
    cache_write: Decimal | None = None   # None: billed as input
    tiers: tuple[tuple[int, Price], ...] = ()

    @classmethod
    def of(cls, input: Decimal | float | int | str, output: Decimal | float | int | str,
           cached_input: Decimal | float | int | str | None = None,
           cache_write: Decimal | float | int | str | None = None,
           tiers: dict[int, Price] | None = None) -> Price:
        """Build from config numbers; cached_input and cache_write default to the input price."""
        inp = _dec(input)
        return cls(inp, inp if cached_input is None else _dec(cached_input), _dec(output),
                   None if cache_write is None else _dec(cache_write),
                   tuple(sorted((tiers or {}).items())))

    def for_prompt(self, prompt: int) -> Price:
        """The price that applies to a request with `prompt` tokens."""
        return _tier(self, self.tiers, prompt)


@dataclass(frozen=True, slots=True)
class _Rates:
    """A price in nano-USD per token: exact ints when possible, else Decimals."""

    input: int | Decimal
    cached_input: int | Decimal
    output: int | Decimal
    cache_write: int | Decimal
    exact: bool
    tiers: tuple[tuple[int, _Rates], ...] = ()

    @classmethod
    def of(cls, p: Price) -> _Rates:
        vals = (p.input, p.cached_input, p.output, p.input if p.cache_write is None else p.cache_write)
        per = [_CTX.multiply(v, _NANO_PER_MILLION) for v in vals]
        tiers = tuple((t, _Rates.of(tp)) for t, tp in p.tiers)
        if all(v == v.to_integral_value() for v in per):
            return cls(int(per[0]), int(per[1]), int(per[2]), int(per[3]), True, tiers)
        return cls(per[0], per[1], per[2], per[3], False, tiers)

    def for_prompt(self, prompt: int) -> _Rates:
        return _tier(self, self.tiers, prompt)


def _tier(base: _P, tiers: tuple[tuple[int, _P], ...], prompt: int) -> _P:
    """The last tier whose threshold `prompt` exceeds (tiers sorted by threshold), else base."""
    chosen = base
    for threshold, tier in tiers:
        if prompt > threshold:
            chosen = tier
    return chosen


_NO_PRICE = object()


class PriceTable:
    """Look up a model's price: exact id first, then globs, longest pattern first, then the
    pricing files (so YAML entries win over them).

    Glob matching is case-sensitive (fnmatch.fnmatchcase); patterns of equal length
    keep their configured order.
    """

    def __init__(self, prices: Mapping[str, Price], files: Mapping[str, Price] | None = None) -> None:
        self._exact: dict[str, Price] = dict(prices)
        self._files: dict[str, Price] = dict(files or {})   # pricing_files: after the config's own
        globs = [(k, v) for k, v in prices.items() if _GLOB_CHARS.intersection(k)]
        self._globs = sorted(globs, key=lambda kv: -len(kv[0]))  # stable sort
        self._memo: dict[str, tuple[Price, _Rates] | object] = {}

    def _find(self, model: str) -> tuple[Price, _Rates] | object:
        hit = self._memo.get(model)
        if hit is not None:
            return hit
        price = self._exact.get(model)
        if price is None:
            price = next((p for pat, p in self._globs if fnmatch.fnmatchcase(model, pat)), None)
        if price is None:
            price = self._files.get(model)
        found: tuple[Price, _Rates] | object = (
            _NO_PRICE if price is None else (price, _Rates.of(price)))
        if len(self._memo) >= _MEMO_MAX:  # model ids come from clients: keep this bounded
            self._memo.clear()
        self._memo[model] = found
        return found

    def lookup(self, model: str) -> Price | None:
        """The price of `model`, or None when it has none."""
        found = self._find(model)
        return found[0] if isinstance(found, tuple) else None

    def cost_nano(self, model: str, usage: Usage) -> tuple[int, bool]:
        """(cost in nano-USD, priced?) of `usage` on `model`; (0, False) when unpriced.

        Uncached prompt at input, cached prompt at cached_input, cache writes at cache_write,
        completion at output, all at the tier the prompt size selects. Completion already
        contains reasoning, so reasoning is never added again.
        """
        found = self._find(model)
        if not isinstance(found, tuple):
            return 0, False
        prompt = max(usage.prompt, 0)
        r: _Rates = found[1].for_prompt(prompt) if found[1].tiers else found[1]
        cached = min(max(usage.cached_prompt, 0), prompt)
        write = min(max(usage.cache_write, 0), prompt - cached)
        uncached = prompt - cached - write
        completion = max(usage.completion, 0)
        if r.exact:
            return (uncached * int(r.input) + cached * int(r.cached_input)
                    + write * int(r.cache_write) + completion * int(r.output)), True
        total = Decimal(0)
        for n, rate in ((uncached, r.input), (cached, r.cached_input), (write, r.cache_write),
                        (completion, r.output)):
            total = _CTX.add(total, _CTX.multiply(Decimal(n), Decimal(rate)))
        # Round once, at the end, half to even.
        return int(total.to_integral_value(rounding=ROUND_HALF_EVEN)), True


def nano_to_usd(n: int) -> float:
    """nano-USD as a float USD (for metrics and JSON; the ledger keeps the int)."""
    return n / 1_000_000_000
