"""OpenAI chat, completions and embeddings (and gateways speaking them): top-level `usage`,
Groq's `x_groq.usage`, an async run's `result.usage`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from meterproxy.metering.readers.paths import dicts_at
from meterproxy.metering.usage import Usage, usage_from_obj


def found(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return dicts_at(obj, ("x_groq", "usage"), ("usage",), ("result", "usage"),
                            ("response", "usage"))


def normalise(u: dict[str, Any]) -> Usage | None:
    return usage_from_obj(u)
