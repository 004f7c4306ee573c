"""SSEDecoder: byte-exact event splitting under every chunking, and event_data."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterproxy.metering.sse import SSEDecoder, event_data

LF = b'data: {"a":1}\n\ndata: {"b":2}\nid: 7\n\n: comment\ndata: x\n\n'
CRLF = LF.replace(b"\n", b"\r\n")
CR = LF.replace(b"\n", b"\r")
MIXED = b"data: a\r\n\ndata: b\n\r\ndata: c\r\rdata: d\n\n"

EXPECTED_LF = [b'data: {"a":1}\n\n', b'data: {"b":2}\nid: 7\n\n', b": comment\ndata: x\n\n"]


def run(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    dec = SSEDecoder()
    events: list[bytes] = []
    for c in chunks:
        events.extend(dec.feed(c))
    return events, dec.flush()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_whole_lf_stream() -> None:
    assert run([LF]) == (EXPECTED_LF, b"")


def test_crlf_and_cr_terminators() -> None:
    assert run([CRLF])[0] == [e.replace(b"\n", b"\r\n") for e in EXPECTED_LF]
    # A trailing "\r" could still be half of "\r\n": held until flush.
    events, rest = run([CR])
    assert events == [e.replace(b"\n", b"\r") for e in EXPECTED_LF][:2]
    assert rest == b": comment\rdata: x\r\r"


def test_mixed_terminators() -> None:
    events, rest = run([MIXED])
    assert events == [b"data: a\r\n\n", b"data: b\n\r\n", b"data: c\r\r", b"data: d\n\n"]
    assert rest == b""


def test_crlf_is_one_terminator_not_two() -> None:
    events, rest = run([b"data: a\r\ndata: b\r\n"])
    assert events == []
    assert rest == b"data: a\r\ndata: b\r\n"


@pytest.mark.parametrize("stream", [LF, CRLF, CR, MIXED])
def test_every_single_split_point(stream: bytes) -> None:
    whole = run([stream])
    for i in range(len(stream) + 1):
        assert run([stream[:i], stream[i:]]) == whole, i


@pytest.mark.parametrize("stream", [LF, CRLF, MIXED])
def test_byte_by_byte(stream: bytes) -> None:
    assert run([bytes([b]) for b in stream]) == run([stream])


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_concatenation_reproduces_input(data: bytes, cuts: list[int]) -> None:
    events, rest = run(split_at(data, cuts))
    assert b"".join(events) + rest == data
    assert (events, rest) == run([data])


@given(
    st.lists(st.sampled_from([b"data: x", b"event: e", b"", b"data:", b": c"]), max_size=30),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(0, 400), max_size=15),
)
def test_random_splits_of_line_streams(lines: list[bytes], nl: bytes, cuts: list[int]) -> None:
    data = nl.join(lines) + nl + nl
    events, rest = run(split_at(data, cuts))
    assert b"".join(events) + rest == data
    assert (events, rest) == run([data])
    # No event except possibly the last held one is missing its blank line.
    for ev in events:
        assert ev.endswith((b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n", b"\n\r"))


def test_big_event_in_small_chunks_is_one_event() -> None:
    payload = b"data: " + b"x" * 200_000 + b"\n\n"
    events, rest = run([payload[i : i + 100] for i in range(0, len(payload), 100)])
    assert events == [payload]
    assert rest == b""


def test_pending_and_peek() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\ndata: b") == [b"data: a\n\n"]
    assert dec.pending
    dec.feed(b"c")
    assert dec.peek() == b"data: bc"
    assert dec.flush() == b"data: bc"
    assert not dec.pending


def test_event_data() -> None:
    assert event_data(b'data: {"a":1}\n\n') == b'{"a":1}'
    assert event_data(b"data:x\ndata:  y\n\n") == b"x\n y"
    assert event_data(b"event: e\r\ndata\r\ndata: z\r\n\r\n") == b"\nz"
    assert event_data(b": comment\nid: 1\ndatum: q\n\n") == b""
    assert event_data(b"data: [DONE]\r\r") == b"[DONE]"
