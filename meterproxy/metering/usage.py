"""Usage: tokens by type for one request (docs/api.md "Metered endpoints": token types)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any


@dataclass(slots=True)
class Usage:
    """Tokens of one request. cached_prompt and cache_write are parts of prompt; reasoning a part
    of completion. provider_cost_nano is the provider's own figure, kept for reconciliation only."""

    prompt: int = 0
    cached_prompt: int = 0
    completion: int = 0
    reasoning: int = 0
    source: str = "provider"   # "provider" | "estimated"
    cache_write: int = 0
    provider_cost_nano: int | None = None

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def count(v: Any) -> int:
    """A token count from JSON: ints (and integral floats) >= 0; anything else counts as 0."""
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return max(v, 0)
    if isinstance(v, float) and v.is_integer():
        return max(int(v), 0)
    return 0


def detail(obj: dict[str, Any], name: str, field: str) -> int:
    """A count nested one level down (`prompt_tokens_details.cached_tokens`), 0 when absent."""
    d = obj.get(name)
    return count(d.get(field)) if isinstance(d, dict) else 0


def usd_to_nano(v: Any) -> int | None:
    """A provider-reported USD amount as integer nano-USD (None when it is not a number)."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return None
    try:
        d = Decimal(str(v)) * 1_000_000_000   # str(): the float's shortest repr, as sent
    except InvalidOperation:
        return None
    return int(d.to_integral_value()) if d.is_finite() else None


def capped(prompt: int, cached: int, cache_write: int, completion: int, reasoning: int,
           cost: int | None = None) -> Usage:
    """A provider Usage whose parts never exceed their whole, whatever a provider sends."""
    cached = min(cached, prompt)
    return Usage(prompt, cached, completion, min(reasoning, completion), "provider",
                 min(cache_write, prompt - cached), cost)


def usage_from_obj(u: Any) -> Usage | None:
    """Read an OpenAI-family `usage` object (chat, completions, embeddings, responses, or an
    Anthropic-shaped one behind an OpenAI-style gateway); None when `u` is not usage.

    Conventions (docs/api.md "Metered endpoints"): DeepSeek `prompt_cache_hit_tokens` is cached prompt;
    `prompt_tokens_details.cache_write_tokens` is cache_write; a `total_tokens` above prompt +
    completion is reasoning the completion left out (xAI's `reasoning_tokens`, the hidden
    thinking of Gemini's OpenAI-compatible endpoint) and is added to completion; `cost` (USD,
    OpenRouter) and `cost_in_usd_ticks` (1e-10 USD, xAI) are the provider's cost.
    """
    if not isinstance(u, dict):
        return None
    write = 0
    if "prompt_tokens" in u or "completion_tokens" in u:
        prompt = count(u.get("prompt_tokens"))
        completion = count(u.get("completion_tokens"))
        cached = max(detail(u, "prompt_tokens_details", "cached_tokens"),
                     count(u.get("prompt_cache_hit_tokens")))
        write = detail(u, "prompt_tokens_details", "cache_write_tokens")
        reasoning = detail(u, "completion_tokens_details", "reasoning_tokens")
    elif "input_tokens" in u or "output_tokens" in u:
        prompt = count(u.get("input_tokens"))
        completion = count(u.get("output_tokens"))
        cached = detail(u, "input_tokens_details", "cached_tokens")
        reasoning = detail(u, "output_tokens_details", "reasoning_tokens")
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
            read = count(u.get("cache_read_input_tokens"))
            write = count(u.get("cache_creation_input_tokens"))
            prompt += read + write
            cached = max(cached, read)
    else:
        return None
    hidden = count(u.get("total_tokens")) - prompt - completion
    if hidden > 0 and completion + prompt > 0:
        completion += hidden
        reasoning = max(reasoning, hidden)
    return capped(prompt, cached, write, completion, reasoning, provider_cost(u))


def provider_cost(u: dict[str, Any]) -> int | None:
    """The provider's own cost in nano-USD: `cost` in USD, or xAI's `cost_in_usd_ticks`."""
    ticks = u.get("cost_in_usd_ticks")
    if isinstance(ticks, int) and not isinstance(ticks, bool):
        return (ticks + 5) // 10   # 1 tick = 1e-10 USD = 0.1 nano-USD, rounded half up
    return usd_to_nano(u.get("cost")) if "cost" in u else None
