"""One usage reader per wire family (docs/api.md "Metered endpoints"): where each family puts its usage
in an event or a JSON body, and how its fields map to the token types.

A reader is fed every decoded event that carries usage (or the whole JSON body) and folds them:
the last usage object wins (providers that repeat cumulative usage on every chunk are never
summed), except Anthropic's, whose `message_start` and `message_delta` each carry part of it.
Anthropic's `message_start` counts one placeholder output token: a stream cut before its
`message_delta` has no provider usage to claim, and is estimated instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from meterproxy.metering.readers import anthropic, gemini, openai, responses
from meterproxy.metering.usage import Usage

Finder = Callable[[dict[str, Any]], Iterator[dict[str, Any]]]
Normaliser = Callable[[dict[str, Any]], Usage | None]

# family → (where its usage objects are, how to normalise one, merge partial objects?)
_FAMILIES: dict[str, tuple[Finder, Normaliser, bool]] = {
    "anthropic": (anthropic.found, anthropic.normalise, True),
    "gemini": (gemini.found, gemini.normalise, False),
    "responses": (responses.found, responses.normalise, False),
}
_OPENAI = (openai.found, openai.normalise, False)   # chat, completions, embeddings, runs, polls


class UsageReader:
    """Fold the usage objects of one answer into one Usage."""

    __slots__ = ("_final", "_find", "_merge", "_norm", "_raw")

    def __init__(self, family: str = "chat") -> None:
        self._find, self._norm, self._merge = _FAMILIES.get(family, _OPENAI)
        self._raw: dict[str, Any] | None = None
        self._final = not self._merge   # merging readers wait for the closing usage object

    def take(self, obj: Any) -> None:
        """Fold the usage objects of one decoded event or body (anything else is ignored)."""
        if not isinstance(obj, dict):
            return
        for u in self._find(obj):
            if obj.get("type") != "message_start":
                self._final = True
            if self._merge and self._raw is not None:
                # Fields a later event leaves out or sends as null keep their earlier value.
                self._raw.update((k, v) for k, v in u.items() if v is not None)
            else:
                self._raw = dict(u)

    def usage(self) -> Usage | None:
        """The provider usage found so far, normalised; None when none arrived."""
        return None if self._raw is None or not self._final else self._norm(self._raw)

