"""I/O-free incremental splitter of a Server-Sent Events byte stream into raw events.

Events are returned as the exact bytes received, terminating blank line included, so
that ``b"".join(all events) + flush()`` is the input byte for byte: the proxy forwards
what it splits and never re-encodes an event it does not need to change.
Line terminators are ``\\r\\n``, ``\\n`` or ``\\r`` (WHATWG HTML, "Parsing an event stream").
"""

from __future__ import annotations

import re

# Two line terminators in a row end an event. A lone "\r" must not be followed by "\n",
# otherwise the "\r" of one "\r\n" and its "\n" would count as two terminators.
_END_RE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_CR = 13
_LF = 10
# The longest terminator pair is 4 bytes, so a new one can start at most 3 bytes back.
_EDGE = 3


def _has_end(buf: bytes) -> bool:
    """Cheap test: could `buf` contain an event terminator? (False positives allowed.)"""
    return b"\n\n" in buf or (b"\r" in buf and _END_RE.search(buf) is not None)


def split_events(buf: bytes) -> tuple[list[bytes], int]:
    """Complete events of `buf` (which starts at an event boundary), and the offset where
    the incomplete remainder starts. A final "\\r" is not taken as an end: a "\\n" may follow.
    """
    events: list[bytes] = []
    start = 0
    n = len(buf)
    if buf.find(b"\r") < 0:
        # Fast path for the usual "\n"-only stream. Single-byte find is memchr, measured
        # ~2x faster than find(b"\n\n"); JSON data lines hold no raw "\n" to skip over.
        find = buf.find
        pos = 0
        while (i := find(b"\n", pos)) >= 0:
            if i + 1 < n and buf[i + 1] == _LF:
                events.append(buf[start : i + 2])
                start = pos = i + 2
            else:
                pos = i + 1
        return events, start
    while (m := _END_RE.search(buf, start)) is not None:
        end = m.end()
        if end == n and buf[end - 1] == _CR:
            break  # a "\n" in the next chunk would belong to this terminator
        events.append(buf[start:end])
        start = end
    return events, start


class SSEDecoder:
    """Split an SSE byte stream into raw events, whatever the chunk boundaries.

    A blank line at the very start of an event (an empty SSE event) is kept attached to
    the event that follows it; byte identity is what matters here, not dispatch.
    """

    __slots__ = ("_edge", "_parts")

    def __init__(self) -> None:
        self._parts: list[bytes] = []   # bytes of the incomplete event, as received
        self._edge = b""                # last bytes of _parts, to find a split terminator

    def feed(self, data: bytes) -> list[bytes]:
        """Add `data`; return the events it completes (possibly none)."""
        if self._parts:
            probe = self._edge + data
            if not _has_end(probe):
                # Still inside the same event: store, do not re-join (keeps big events O(n)).
                self._parts.append(data)
                self._edge = probe[-_EDGE:]
                return []
            self._parts.append(data)
            buf = b"".join(self._parts)
            self._parts = []
        else:
            buf = bytes(data)  # a no-op for bytes; bytearray/memoryview are copied once
        events, start = split_events(buf)
        if start < len(buf):
            rest = buf[start:] if start else buf
            self._parts = [rest]
            self._edge = rest[-_EDGE:]
        return events

    def flush(self) -> bytes:
        """Return (and forget) the trailing bytes that did not complete an event."""
        rest = b"".join(self._parts)
        self._parts = []
        self._edge = b""
        return rest

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete event are held."""
        return bool(self._parts)

    def peek(self) -> bytes:
        """The held bytes of the incomplete event, without forgetting them."""
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0] if self._parts else b""


def event_data(event: bytes) -> bytes:
    """The event's ``data`` field: its data lines' values joined with ``\\n``.

    One optional space after the colon is stripped; a bare ``data`` line counts as an
    empty value. Other fields (event, id, retry) and comments are ignored.
    """
    values: list[bytes] = []
    for line in event.splitlines():
        if not line.startswith(b"data"):
            continue
        if len(line) == 4:
            values.append(b"")
        elif line[4] == 0x3A:  # ":"
            v = line[5:]
            values.append(v[1:] if v[:1] == b" " else v)
    return b"\n".join(values)
