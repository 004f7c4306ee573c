"""Usage: tokens by type for one request, and extractors for every provider flavor's usage shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Usage:
    """Tokens of one request. cached_prompt is a part of prompt; reasoning a part of completion."""

    prompt: int = 0
    cached_prompt: int = 0
    completion: int = 0
    reasoning: int = 0
    source: str = "provider"   # "provider" | "estimated"

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def __add__(self, other: Usage) -> Usage:
        src = "estimated" if "estimated" in (self.source, other.source) else "provider"
        return Usage(self.prompt + other.prompt, self.cached_prompt + other.cached_prompt,
                     self.completion + other.completion, self.reasoning + other.reasoning, src)


def _int(v: Any) -> int:
    """A token count from JSON: ints (and integral floats) >= 0; anything else counts as 0."""
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return max(v, 0)
    if isinstance(v, float) and v.is_integer():
        return max(int(v), 0)
    return 0


def _detail(obj: dict[str, Any], name: str, field: str) -> int:
    d = obj.get(name)
    return _int(d.get(field)) if isinstance(d, dict) else 0


def usage_from_obj(u: Any) -> Usage | None:
    """Read a provider `usage` object in any of the shapes of SPEC.md "Metering rules".

    OpenAI chat/completions/embeddings: prompt_tokens, completion_tokens,
    prompt_tokens_details.cached_tokens, completion_tokens_details.reasoning_tokens.
    Responses API: input_tokens, output_tokens, input_tokens_details.cached_tokens,
    output_tokens_details.reasoning_tokens. Anthropic: input_tokens, output_tokens,
    cache_read_input_tokens, cache_creation_input_tokens (Anthropic's input_tokens excludes
    cache reads and writes, so both are added to prompt; cache reads are the cached part).
    Extra fields such as total_time are ignored. Returns None when `u` is not a usage object.
    """
    if not isinstance(u, dict):
        return None
    if "prompt_tokens" in u or "completion_tokens" in u:
        prompt = _int(u.get("prompt_tokens"))
        completion = _int(u.get("completion_tokens"))
        cached = _detail(u, "prompt_tokens_details", "cached_tokens")
        reasoning = _detail(u, "completion_tokens_details", "reasoning_tokens")
    elif "input_tokens" in u or "output_tokens" in u:
        prompt = _int(u.get("input_tokens"))
        completion = _int(u.get("output_tokens"))
        cached = _detail(u, "input_tokens_details", "cached_tokens")
        reasoning = _detail(u, "output_tokens_details", "reasoning_tokens")
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
            read = _int(u.get("cache_read_input_tokens"))
            created = _int(u.get("cache_creation_input_tokens"))
            prompt += read + created
            cached = max(cached, read)
    else:
        return None
    # A part never exceeds its whole, whatever a provider sends.
    return Usage(prompt, min(cached, prompt), completion, min(reasoning, completion), "provider")
