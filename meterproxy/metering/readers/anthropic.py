"""Anthropic Messages: `message_start.message.usage` (input and cache figures, a first output
count) then `message_delta.usage` (cumulative output, newer API versions repeat the input
figures); a JSON answer has them all in `usage`.

`input_tokens` excludes cache reads and writes, so prompt = input + cache_read + cache_write.
Thinking is billed inside `output_tokens`; Anthropic reports no separate count of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from meterproxy.metering.readers.paths import dicts_at
from meterproxy.metering.usage import Usage, capped, count, provider_cost


def found(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return dicts_at(obj, ("message", "usage"), ("usage",))


def normalise(u: dict[str, Any]) -> Usage | None:
    if "input_tokens" not in u and "output_tokens" not in u:
        return None
    read = count(u.get("cache_read_input_tokens"))
    write = count(u.get("cache_creation_input_tokens"))
    prompt = count(u.get("input_tokens")) + read + write
    return capped(prompt, read, write, count(u.get("output_tokens")), 0, provider_cost(u))
