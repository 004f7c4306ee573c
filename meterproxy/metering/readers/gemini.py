"""Gemini generateContent / streamGenerateContent: `usageMetadata` (on every streamed chunk,
cumulative: the last wins).

promptTokenCount includes the cached content; toolUsePromptTokenCount (tool results the model
read) is input too. candidatesTokenCount excludes thinking, so completion = candidates +
thoughts, and thoughts are the reasoning part.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from meterproxy.metering.readers.paths import dicts_at
from meterproxy.metering.usage import Usage, capped, count


def found(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return dicts_at(obj, ("usageMetadata",))


def normalise(u: dict[str, Any]) -> Usage | None:
    prompt = count(u.get("promptTokenCount")) + count(u.get("toolUsePromptTokenCount"))
    thoughts = count(u.get("thoughtsTokenCount"))
    completion = count(u.get("candidatesTokenCount")) + thoughts
    return capped(prompt, count(u.get("cachedContentTokenCount")), 0, completion, thoughts)
