"""StreamScanner: find usage in a streamed response while its bytes pass through.

This sits on the hot path of every streamed response, so per chunk it does only
C-speed byte searches and list appends. JSON is decoded only for events that carry a
usage object, and (lazily, in batches) for completion-text estimation.

Two modes (SPEC.md "Metering rules"):

* ``strip_usage=False``: the client sees the upstream bytes untouched; ``feed`` returns
  the very chunk object it was given.
* ``strip_usage=True``: the proxy added ``stream_options.include_usage`` upstream, so it
  removes what that option added — every ``"usage":null`` member and the usage-only
  chunk (``"choices":[]`` plus a ``usage`` object) — and nothing else. The client gets
  the byte stream it would have got without the option.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from meterproxy.metering.sse import SSEDecoder, event_data
from meterproxy.metering.usage import Usage, usage_from_obj

# A non-null usage object: "usage", optional whitespace, ":", optional whitespace, "{".
_USAGE_OBJ = re.compile(rb'"usage"\s*:\s*\{')
# A `"usage":null` member with the separator that joins it to its neighbours. Removing
# these bytes is safe: inside a JSON string every '"' is escaped, so an unescaped
# `"usage"` followed by ':' is always an object key. Space-separated variants included.
_USAGE_NULL = re.compile(
    rb',\s*"usage"\s*:\s*null(?=\s*[,}])'        # ...,"usage":null}  /  , "usage": null,
    rb'|(\{\s*)"usage"\s*:\s*null\s*,\s*'          # {"usage":null,...
)
_DONE = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\][\r\n]")
# Bytes kept from the previous chunk to find a marker split across two chunks.
_TAIL = 64
# Retained raw event bytes above this are reduced to their text (bounded memory).
_COMPACT_AT = 64 * 1024

_DONE_TYPES = frozenset({"response.completed", "message_stop"})
# Responses API delta events whose `delta` string is model output.
_RESPONSES_DELTAS = frozenset({
    "response.output_text.delta",
    "response.refusal.delta",
    "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta",
    "response.function_call_arguments.delta",
})


def _decode(event: bytes) -> Any:
    """The event's data as JSON, or None for [DONE], empty or malformed data."""
    payload = event_data(event).strip()
    if not payload.startswith(b"{"):
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _append_str(out: list[str], v: Any) -> None:
    if isinstance(v, str) and v:
        out.append(v)


def _extract_text(obj: dict[str, Any], out: list[str]) -> None:
    """Append the model-output strings of one decoded chunk to `out`."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            _append_str(out, ch.get("text"))  # legacy /v1/completions
            d = ch.get("delta")
            if not isinstance(d, dict):
                continue
            _append_str(out, d.get("reasoning_content"))
            _append_str(out, d.get("content"))
            calls = d.get("tool_calls")
            if isinstance(calls, list):
                for tc in calls:
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if isinstance(fn, dict):
                        _append_str(out, fn.get("arguments"))
        return
    typ = obj.get("type")
    if typ in _RESPONSES_DELTAS:
        _append_str(out, obj.get("delta"))
    elif typ == "content_block_delta":  # Anthropic-style
        d = obj.get("delta")
        if isinstance(d, dict):
            for k in ("text", "thinking", "partial_json"):
                _append_str(out, d.get(k))


class StreamScanner:
    """Pass a streamed response through, metering it; see the module docstring.

    Call ``feed`` with each upstream chunk and send what it returns, then ``finish``
    at the end of the stream and send that too. Afterwards ``usage`` is the provider
    usage found (None if none) and ``completion_text()`` the output seen, for estimation.
    """

    __slots__ = (
        "_dec", "_hit", "_kept", "_kept_len", "_raw", "_raw_len", "_rest", "_tail",
        "_text", "chunks", "saw_done", "strip_usage", "usage",
    )

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None   # max per field over every usage object seen
        self.saw_done = False             # [DONE], response.completed or message_stop seen
        self.chunks = 0
        self._dec = SSEDecoder()
        self._raw: list[bytes] = []       # pass-through mode: chunks not yet split
        self._raw_len = 0
        self._kept: list[bytes] = []      # complete events not yet reduced to text
        self._kept_len = 0
        self._text: list[str] = []        # text of events already reduced
        self._tail = b""
        self._hit = False                 # a usage marker awaits its event's end
        self._rest = b""                  # incomplete bytes left at finish()

    # -- hot path ---------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Take one upstream chunk; return the bytes to forward to the client now."""
        self.chunks += 1
        if self.strip_usage:
            return self._feed_strip(chunk)
        self._raw.append(chunk)
        self._raw_len += len(chunk)
        if not self._hit:
            if _USAGE_OBJ.search(chunk) is not None:
                self._hit = True
            elif self._tail:
                edge = self._tail + chunk[:_TAIL]
                self._hit = _USAGE_OBJ.search(edge) is not None
                if b"[DONE]" in edge and _DONE.search(edge):
                    self.saw_done = True
        if (b"[DONE]" in chunk and _DONE.search(chunk)) or b'"type":"message_stop"' in chunk:
            self.saw_done = True
        self._tail = chunk[-_TAIL:]
        if self._hit or self._raw_len + self._kept_len > _COMPACT_AT:
            self._drain()
        return chunk

    def _feed_strip(self, chunk: bytes) -> bytes:
        dec = self._dec
        held = dec.pending
        events = dec.feed(chunk)
        if not events:
            return b""
        changed = held or dec.pending  # output is not exactly `chunk`
        out: list[bytes] = []
        for ev in events:
            new = self._rewrite(ev)
            if new is not ev:
                changed = True
            if new:
                out.append(new)
        if self._kept_len > _COMPACT_AT:
            self._compact()
        return b"".join(out) if changed else chunk

    def _rewrite(self, ev: bytes) -> bytes:
        """One complete event with what include_usage added removed (b"" = drop it)."""
        self._kept.append(ev)
        self._kept_len += len(ev)
        if b'"usage"' not in ev:
            if b"[DONE]" in ev and event_data(ev).strip() == b"[DONE]":
                self.saw_done = True
            return ev
        new, n = _USAGE_NULL.subn(rb"\1", ev)
        if _USAGE_OBJ.search(new) is not None:
            obj = _decode(new)
            if isinstance(obj, dict):
                self._take_usage(obj)
                if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
                    return b""  # the usage-only chunk the client did not ask for
        return new if n else ev

    # -- off the hot path ---------------------------------------------------------

    def _drain(self) -> None:
        """Pass-through mode: split retained chunks into events; decode usage events."""
        if self._raw:
            buf = b"".join(self._raw) if len(self._raw) > 1 else self._raw[0]
            self._raw = []
            self._raw_len = 0
            for ev in self._dec.feed(buf):
                if b'"usage"' in ev and _USAGE_OBJ.search(ev) is not None:
                    obj = _decode(ev)
                    if isinstance(obj, dict):
                        self._take_usage(obj)
                        _extract_text(obj, self._text)
                    continue
                self._kept.append(ev)
                self._kept_len += len(ev)
        # Still waiting only if the incomplete event itself holds the marker.
        self._hit = self._dec.pending and _USAGE_OBJ.search(self._dec.peek()) is not None
        if self._kept_len > _COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        """Reduce retained events to their text, so memory is bounded by text, not JSON."""
        text = self._text
        for ev in self._kept:
            obj = _decode(ev)
            if isinstance(obj, dict):
                _extract_text(obj, text)
                if obj.get("type") in _DONE_TYPES:
                    self.saw_done = True
        self._kept = []
        self._kept_len = 0
        if len(text) > 1:
            self._text = ["".join(text)]

    def _take_usage(self, obj: dict[str, Any]) -> None:
        """Fold every usage object of a decoded event into self.usage (max per field)."""
        if obj.get("type") in _DONE_TYPES:
            self.saw_done = True
        found = [obj.get("usage")]
        for key in ("response", "message"):  # Responses API, Anthropic message_start
            inner = obj.get(key)
            if isinstance(inner, dict):
                found.append(inner.get("usage"))
        for u in found:
            got = usage_from_obj(u)
            if got is None:
                continue
            cur = self.usage
            if cur is None:
                self.usage = got
            else:
                cur.prompt = max(cur.prompt, got.prompt)
                cur.cached_prompt = max(cur.cached_prompt, got.cached_prompt)
                cur.completion = max(cur.completion, got.completion)
                cur.reasoning = max(cur.reasoning, got.reasoning)

    def finish(self) -> bytes:
        """End of stream: return the held-back bytes to forward (as received)."""
        if not self.strip_usage:
            # Everything was forwarded already; only a usage event cut short is left to read.
            if self._hit:
                self._drain()
                if self._hit:
                    self._take_rest(self._dec.peek())
            return b""
        rest = self._dec.flush()
        self._rest = rest
        self._take_rest(rest)
        return rest

    def _take_rest(self, rest: bytes) -> None:
        """Read usage / [DONE] from bytes that never got their terminating blank line."""
        if not rest:
            return
        if _USAGE_OBJ.search(rest) is not None:
            obj = _decode(rest)
            if isinstance(obj, dict):
                self._take_usage(obj)
        if _DONE.search(rest + b"\n"):
            self.saw_done = True

    def completion_text(self) -> str:
        """All model output seen (content, reasoning, tool arguments), concatenated."""
        if self._raw:
            self._drain()
        self._compact()
        parts = list(self._text)
        tail = self._rest or self._dec.peek()
        if tail:
            obj = _decode(tail)  # an event cut short may still be whole JSON
            if isinstance(obj, dict):
                _extract_text(obj, parts)
        return "".join(parts)
