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

from meterproxy.metering.sse import SSEDecoder, event_data, last_event_end, split_events
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
# Pass-through mode stops following an event (for its usage) past this size.
_MAX_EVENT = 4 * 1024 * 1024
# Chunk endings that are certainly event boundaries.
_ENDS = (b"\n\n", b"\r\n\r\n")

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
        "_dec", "_hit", "_kept", "_kept_len", "_pend", "_pend_len", "_raw", "_raw_len",
        "_rest", "_tail", "_text", "chunks", "saw_done", "strip_usage", "usage",
    )

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None   # max per field over every usage object seen
        self.saw_done = False             # [DONE], response.completed or message_stop seen
        self.chunks = 0
        # Text retention (for estimates): raw chunks (pass-through) or events (strip),
        # reduced to text past _COMPACT_AT. raw[0] always starts at an event boundary.
        self._raw: list[bytes] = []
        self._raw_len = 0
        self._kept: list[bytes] = []
        self._kept_len = 0
        self._text: list[str] = []
        # Usage finding in pass-through mode: bytes since the last event boundary.
        self._pend: list[bytes] = []
        self._pend_len = 0
        self._hit = False                 # a usage marker awaits the end of its event
        self._tail = b""
        self._dec = SSEDecoder()          # strip mode only
        self._rest = b""                  # incomplete bytes returned by finish()

    # -- hot path ---------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Take one upstream chunk; return the bytes to forward to the client now."""
        self.chunks += 1
        if self.strip_usage:
            return self._feed_strip(chunk)
        self._raw.append(chunk)
        self._raw_len += len(chunk)
        # One C-speed search over the previous chunk's tail + this chunk finds a marker
        # even when split across the two; a match wholly inside the tail was seen before.
        tail = self._tail
        buf = tail + chunk if tail else chunk
        m = _USAGE_OBJ.search(buf)
        while m is not None and m.end() <= len(tail):
            m = _USAGE_OBJ.search(buf, m.start() + 1)
        if m is not None:
            self._hit = True
        # rfind: measured ~3x faster than `in` for these needles on short chunks.
        done = buf.rfind(b"[DONE]") >= 0 and _DONE.search(buf) is not None
        if done or chunk.rfind(b'"type":"message_stop"') >= 0:
            self.saw_done = True
        self._tail = chunk[-_TAIL:]
        if chunk.endswith(_ENDS):
            # The usual case: each network chunk is whole events.
            if self._hit:
                self._pend.append(chunk)
                self._scan_usage(b"".join(self._pend))
            if self._pend:
                self._pend = []
                self._pend_len = 0
        else:
            self._track_boundary(chunk)
        if self._raw_len > _COMPACT_AT:
            self._compact_raw()
        return chunk

    def _track_boundary(self, chunk: bytes) -> None:
        """Keep _pend = the bytes since the last event boundary (bounded)."""
        if not self._hit:
            j = last_event_end(chunk)
            if j >= 0:
                self._pend = [chunk[j:]]
                self._pend_len = len(chunk) - j
                return
        self._pend.append(chunk)
        self._pend_len += len(chunk)
        if self._pend_len > _MAX_EVENT:
            # An absurd event: stop following it; usage in it falls back to estimation.
            self._pend = []
            self._pend_len = 0
            self._hit = False

    def _scan_usage(self, buf: bytes) -> None:
        """Decode the events of `buf` (starting at a boundary) that hold a usage object."""
        events, start = split_events(buf)
        if start < len(buf):
            events.append(buf[start:])
        for ev in events:
            if b'"usage"' in ev and _USAGE_OBJ.search(ev) is not None:
                obj = _decode(ev)
                if isinstance(obj, dict):
                    self._take_usage(obj)
        self._hit = False

    def _feed_strip(self, chunk: bytes) -> bytes:
        dec = self._dec
        if (not dec.pending and chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2
                and chunk.find(b"\r") < 0 and isinstance(chunk, bytes)):
            # The usual case, one whole "\n"-terminated event per network chunk: skip the splitter.
            new = self._rewrite(chunk)
            if self._kept_len > _COMPACT_AT:
                self._compact_kept()
            return new
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
            self._compact_kept()
        return b"".join(out) if changed else chunk

    def _rewrite(self, ev: bytes) -> bytes:
        """One complete event with what include_usage added removed (b"" = drop it)."""
        self._kept.append(ev)
        self._kept_len += len(ev)
        # OpenAI's compact form first, as a plain replace (safe: see _USAGE_NULL).
        new = ev.replace(b',"usage":null', b"")
        if new.rfind(b'"usage"') >= 0:  # spaced or leading variants, or a usage object
            new = _USAGE_NULL.sub(rb"\1", new)
            if new.rfind(b'"usage"') >= 0 and _USAGE_OBJ.search(new) is not None:
                obj = _decode(new)
                if isinstance(obj, dict):
                    self._take_usage(obj)
                    if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
                        return b""  # the usage-only chunk the client did not ask for
        elif new is ev and ev.rfind(b"[DONE]") >= 0 and event_data(ev).strip() == b"[DONE]":
            self.saw_done = True
        return ev if new == ev else new

    # -- off the hot path ---------------------------------------------------------

    def _compact_raw(self) -> None:
        """Pass-through mode: reduce retained complete events to text."""
        if not self._raw:
            return
        buf = b"".join(self._raw)
        events, start = split_events(buf)
        rest = buf[start:]
        self._raw = [rest] if rest else []
        self._raw_len = len(rest)
        self._kept.extend(events)
        self._compact_kept()

    def _compact_kept(self) -> None:
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
            # Everything was forwarded already; only a usage event cut short is left.
            if self._hit:
                self._scan_usage(b"".join(self._pend))
            return b""
        rest = self._dec.flush()
        self._rest = rest
        if rest:
            if _USAGE_OBJ.search(rest) is not None:
                obj = _decode(rest)  # a usage event that lost its blank line still counts
                if isinstance(obj, dict):
                    self._take_usage(obj)
            if _DONE.search(rest + b"\n"):
                self.saw_done = True
        return rest

    def completion_text(self) -> str:
        """All model output seen (content, reasoning, tool arguments), concatenated."""
        if self.strip_usage:
            self._compact_kept()
            tail = self._rest or self._dec.peek()
        else:
            self._compact_raw()
            tail = b"".join(self._raw)
        parts = list(self._text)
        if tail:
            obj = _decode(tail)  # an event cut short may still be whole JSON
            if isinstance(obj, dict):
                _extract_text(obj, parts)
        return "".join(parts)
