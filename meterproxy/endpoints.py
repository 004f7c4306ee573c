"""Which metered endpoint a request path names: one table, read by admission, metering and estimates.

A path is classified after `normalise`, so every spelling of a metered endpoint (a trailing
slash, `;params` on a segment, doubled slashes) is metered as that endpoint. The family decides
how the body is read (model, max-output fields), how usage is found in the answer, and whether
`stream_options.include_usage` may be injected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meterproxy.errors import InvalidRequest

# family → (path suffix, include_usage applies). Longest suffix first where one ends another.
_SUFFIXES: tuple[tuple[str, str, bool], ...] = (
    ("/chat/completions", "chat", True),
    ("/chat_completion", "runs_chat", True),
    ("/completions", "completions", True),
    ("/embeddings", "embeddings", False),
    ("/responses", "responses", False),
    ("/v1/messages", "anthropic", False),
)
# Gemini names the model and the method in the last segment: /v1beta/models/{model}:{method}.
_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A metered endpoint: its wire family and what the path itself says."""

    family: str                 # chat | runs_chat | completions | embeddings | responses | anthropic | gemini
    stream_options: bool        # OpenAI-style include_usage injection applies
    path_model: str | None = None   # the model named in the path (Gemini), else None
    path_streams: bool = False  # the path alone asks for a stream (Gemini :streamGenerateContent)


def normalise(path: str) -> str:
    """The path as endpoints are matched: `;params` dropped from every segment, empty segments
    (doubled or trailing slashes) removed. Percent-decoding is the server's (ASGI `path`)."""
    if ";" in path:
        path = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    if "//" in path or (path.endswith("/") and len(path) > 1):
        path = "/" + "/".join(seg for seg in path.split("/") if seg)
    return path


def classify(path: str) -> Endpoint | None:
    """The metered endpoint of a normalised path, or None for a pass-through path."""
    m = _GEMINI.search(path)
    if m is not None:
        return Endpoint("gemini", False, m.group(1), m.group(2) == "streamGenerateContent")
    for suffix, family, stream_options in _SUFFIXES:
        if path.endswith(suffix):
            return Endpoint(family, stream_options)
    return None


# Control characters in the decoded path (`%00`, `%0a`...), and encoded separators in the raw one:
# `/v1/chat%2Fcompletions` is one segment to a provider that splits before decoding and two to one
# that decodes first, so the proxy could meter or allowlist a path the provider reads differently.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_SEPARATOR = re.compile(rb"%(?:2[fF]|5[cC])")


def check_path(path: str, raw_path: bytes) -> None:
    """Refuse (400) a path that providers could read differently from the proxy."""
    if _CONTROL.search(path) is not None:
        raise InvalidRequest("The path contains control characters.")
    if b"%" in raw_path and _ENCODED_SEPARATOR.search(raw_path) is not None:
        raise InvalidRequest("Encoded slashes or backslashes (%2F, %5C) are not allowed in the path.")


# The model a path names, Gemini style (/v1beta/models/{model}:generateContent, :countTokens,
# :embedContent, ...): checked against the key's allowlist whatever the method after the colon.
_PATH_MODEL = re.compile(r"/models/([^/:]+):[A-Za-z]+$")


def path_model(path: str) -> str | None:
    """The model named in a normalised path, or None."""
    m = _PATH_MODEL.search(path) if ":" in path else None
    return m.group(1) if m is not None else None
