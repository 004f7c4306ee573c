"""The admission reservation (docs/api.md "Metered endpoints"): a prompt estimate plus the completion
allowance, family-aware, computed without a tokeniser (settlement corrects it)."""

from __future__ import annotations

from typing import Any

from meterproxy.metering.estimate import cheap_prompt_estimate

MAX_N = 128  # reservation multiplier cap; request.py refuses a larger n (400) before admission
# Max-output fields as each family spells them; the largest one present is reserved, so a body
# carrying two (an SDK default beside the caller's) never reserves less than may be generated.
_MAX_OUTPUT = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def completion_allowance(body: dict[str, Any], default: int) -> int:
    """The most output the body allows per choice, or `default` when it names no limit."""
    found = [v for v in (_positive_int(body.get(k)) for k in _MAX_OUTPUT) if v is not None]
    gen = body.get("generationConfig")   # Gemini
    if isinstance(gen, dict):
        v = _positive_int(gen.get("maxOutputTokens"))
        if v is not None:
            found.append(v)
    return max(found) if found else default


def choices(body: dict[str, Any]) -> int:
    """How many answers the body asks for: OpenAI `n`, Gemini `generationConfig.candidateCount`."""
    n = _positive_int(body.get("n"))
    gen = body.get("generationConfig")
    if n is None and isinstance(gen, dict):
        n = _positive_int(gen.get("candidateCount"))
    return min(n or 1, MAX_N)


def reservation_tokens(body: dict[str, Any] | None, body_len: int, default_max_tokens: int) -> int:
    """Tokens to reserve: a cheap prompt estimate from the body size (tokenising on the hot path
    is CPU we need not spend) + the completion allowance times the number of answers."""
    if body is None:
        return 0
    return cheap_prompt_estimate(body_len) + completion_allowance(body, default_max_tokens) * choices(body)
