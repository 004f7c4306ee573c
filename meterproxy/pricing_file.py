"""Prices from files in LiteLLM's `model_prices_and_context_window.json` format.

The file maps a model id to an entry of per-token USD prices: `input_cost_per_token`,
`output_cost_per_token`, `cache_read_input_token_cost`, `cache_creation_input_token_cost`, and
long-context tiers `<field>_above_<N>k_tokens`. Numbers are read from the JSON text as Decimal
(never through a binary float), so 2.5e-06 USD is exactly 2,500 nano-USD per token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

from meterproxy.pricing import Price

_CTX = Context(prec=60)
_MILLION = Decimal(1_000_000)
# Our field ← LiteLLM's per-token field.
_FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cached_input": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
}
_TIER = re.compile(r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|"
                   r"cache_creation_input_token_cost)_above_(\d+)(k?)_tokens$")
# Fields that describe a model without pricing a token meterproxy meters.
_INFO = frozenset({"litellm_provider", "mode", "max_tokens", "max_input_tokens", "max_output_tokens",
                   "source", "deprecation_date", "metadata", "comment", "tool_use_system_prompt_tokens",
                   "output_vector_size", "supported_endpoints", "supported_modalities",
                   "supported_output_modalities", "supported_regions"})


@dataclass(frozen=True, slots=True)
class FileReport:
    """What check-config says about one pricing file."""

    path: str
    priced: int                     # models this file prices (the YAML does not)
    unknown: tuple[str, ...]        # fields of used entries that meterproxy does not read


def _per_million(v: Any) -> Decimal | None:
    if isinstance(v, Decimal):
        return _CTX.multiply(v, _MILLION)
    if isinstance(v, int) and not isinstance(v, bool):
        return _CTX.multiply(Decimal(v), _MILLION)
    return None


def _price(entry: dict[str, Any]) -> Price | None:
    """An entry's Price (USD per million tokens), or None when it lacks input or output."""
    got = {ours: _per_million(entry.get(theirs)) for ours, theirs in _FIELDS.items()}
    inp, out = got["input"], got["output"]
    if inp is None or out is None:
        return None
    tiers: dict[int, dict[str, Decimal]] = {}
    for name, value in entry.items():
        m = _TIER.match(name)
        v = _per_million(value)
        if m is None or v is None:
            continue
        threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
        ours = next(k for k, theirs in _FIELDS.items() if theirs == m.group(1))
        tiers.setdefault(threshold, {})[ours] = v
    base = Price.of(inp, out, got["cached_input"], got["cache_write"])
    # A field a tier leaves out keeps the base price.
    return Price.of(inp, out, got["cached_input"], got["cache_write"], tiers={
        t: Price.of(f.get("input", base.input), f.get("output", base.output),
                    f.get("cached_input", base.cached_input), f.get("cache_write", base.cache_write))
        for t, f in tiers.items()})


def _unknown(entry: dict[str, Any]) -> set[str]:
    return {k for k in entry if k not in _INFO and k not in _FIELDS.values() and not _TIER.match(k)
            and not k.startswith(("supports_", "supported_"))}


def load_pricing_file(path: Path, shadowed: Callable[[str], bool] = lambda _: False,
                      ) -> tuple[dict[str, Price], FileReport]:
    """Read one file; raise ValueError (with a message for check-config) when it is unusable.
    Models `shadowed` says the YAML prices already are skipped: YAML entries win."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a JSON object of model entries")
    prices: dict[str, Price] = {}
    unknown: set[str] = set()
    for model, entry in data.items():
        if not isinstance(entry, dict) or model == "sample_spec" or shadowed(model):
            continue   # sample_spec: LiteLLM's documentation entry
        price = _price(entry)
        if price is not None:
            prices[model] = price
            unknown |= _unknown(entry)
    return prices, FileReport(str(path), len(prices), tuple(sorted(unknown)))
