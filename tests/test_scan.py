"""StreamScanner: identity pass-through, exact include_usage stripping, usage and text found."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproxy.metering.scan import StreamScanner
from meterproxy.metering.usage import Usage

USAGE = {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43,
         "prompt_tokens_details": {"cached_tokens": 8},
         "completion_tokens_details": {"reasoning_tokens": 4}}


def _chunks(with_usage: bool, style: str) -> list[dict[str, Any]]:
    """One chat stream as chunk objects, as OpenAI sends it with or without include_usage."""
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "think"},
        {"content": "Hello"},
        {"content": ", wor\"usage\":null,ld"},  # the marker inside a string is left alone
        {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": '{"a":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
    ]
    out = []
    for i, d in enumerate([*deltas, {}]):
        obj: dict[str, Any] = {}
        if with_usage and style == "first":
            obj["usage"] = None
        obj |= {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": d,
                             "finish_reason": "stop" if i == len(deltas) else None}]}
        if with_usage and style != "first":
            obj["usage"] = None
        out.append(obj)
    if with_usage:
        out.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [], "usage": USAGE})
    return out


def stream(with_usage: bool, style: str = "compact", nl: bytes = b"\n", stripped: bool = False) -> bytes:
    """The stream as sent; `stripped`: as the client must see it after the proxy removed the
    usage-only chunk it caused (every other byte, "usage":null members included, unchanged)."""
    seps = (",", ":") if style in ("compact", "first") else (", ", ": ")
    objs = _chunks(with_usage, style)
    events = [b"data: " + json.dumps(o, separators=seps).encode() + nl + nl
              for o in (objs[:-1] if stripped else objs)]
    return b"".join(events) + b"data: [DONE]" + nl + nl


def run(chunks: list[bytes], strip: bool, family: str = "chat") -> tuple[bytes, StreamScanner]:
    sc = StreamScanner(family, strip_usage=strip)
    out = [sc.feed(c) for c in chunks]
    out.append(sc.finish())
    return b"".join(out), sc


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


EXPECTED_USAGE = Usage(31, 8, 12, 4, "provider")  # total_tokens 43 = 31 + 12: nothing hidden
EXPECTED_TEXT = 'thinkHello, wor"usage":null,ld{"a":1}'


# -- pass-through ---------------------------------------------------------------------


def test_passthrough_returns_the_same_objects() -> None:
    data = stream(True)
    chunks = split_at(data, list(range(0, len(data), 97)))
    sc = StreamScanner(strip_usage=False)
    for c in chunks:
        assert sc.feed(c) is c
    assert sc.finish() == b""
    assert sc.usage == EXPECTED_USAGE
    assert sc.saw_done


@settings(max_examples=300)
@given(st.lists(st.integers(0, 3000), max_size=30), st.sampled_from(["compact", "spaced"]),
       st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_passthrough_identity_and_usage_under_random_splits(
        cuts: list[int], style: str, nl: bytes) -> None:
    data = stream(True, style, nl)
    out, sc = run(split_at(data, cuts), strip=False)
    assert out == data
    assert sc.usage == EXPECTED_USAGE
    assert sc.saw_done
    assert sc.completion_text() == EXPECTED_TEXT


def test_usage_marker_split_at_every_byte() -> None:
    data = stream(True)
    at = data.index(b'"usage":{')
    for i in range(at - 2, at + 12):
        out, sc = run([data[:i], data[i:]], strip=False)
        assert out == data
        assert sc.usage == EXPECTED_USAGE, i


def test_null_usage_is_never_decoded_as_a_hit() -> None:
    sc = StreamScanner(strip_usage=False)
    sc.feed(stream(True).split(b'"choices":[]')[0])  # everything before the usage chunk
    assert sc.usage is None


# -- strip include_usage --------------------------------------------------------------


@pytest.mark.parametrize("style", ["compact", "spaced", "first"])
@pytest.mark.parametrize("nl", [b"\n", b"\r\n"])
def test_strip_gives_the_stream_without_include_usage(style: str, nl: bytes) -> None:
    src, want = stream(True, style, nl), stream(True, style, nl, stripped=True)
    assert src != want
    out, sc = run([src], strip=True)
    assert out == want
    assert sc.usage == EXPECTED_USAGE
    assert sc.saw_done
    assert sc.completion_text() == EXPECTED_TEXT


@pytest.mark.parametrize("style", ["compact", "spaced"])
def test_strip_at_every_split_point(style: str) -> None:
    src, want = stream(True, style), stream(True, style, stripped=True)
    for i in range(len(src) + 1):
        out, sc = run([src[:i], src[i:]], strip=True)
        assert out == want, i
        assert sc.usage == EXPECTED_USAGE


@settings(max_examples=300)
@given(st.lists(st.integers(0, 3000), max_size=40), st.sampled_from(["compact", "spaced", "first"]),
       st.sampled_from([b"\n", b"\r\n"]))
def test_strip_under_random_splits(cuts: list[int], style: str, nl: bytes) -> None:
    out, sc = run(split_at(stream(True, style, nl), cuts), strip=True)
    assert out == stream(True, style, nl, stripped=True)
    assert sc.usage == EXPECTED_USAGE


def test_strip_returns_the_chunk_itself_when_nothing_changes() -> None:
    sc = StreamScanner(strip_usage=True)
    ev = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    assert sc.feed(ev) is ev
    assert sc.feed(b"data: [DO") == b""  # incomplete: held
    assert sc.feed(b"NE]\n\n") == b"data: [DONE]\n\n"
    assert sc.saw_done


def test_strip_holds_incomplete_bytes_until_finish() -> None:
    sc = StreamScanner(strip_usage=True)
    assert sc.feed(b'data: {"choices":[],"usage":null') == b""
    assert sc.finish() == b'data: {"choices":[],"usage":null'


def test_strip_keeps_usage_sent_on_a_content_chunk() -> None:
    ev = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":3}}\n\n'
    out, sc = run([ev], strip=True)
    assert out == ev
    assert sc.usage == Usage(3, 0, 0, 0)


# -- other flavors ----------------------------------------------------------------------


def sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_responses_api_stream() -> None:
    events = [
        sse({"type": "response.created", "response": {"id": "r", "usage": None}},
            "response.created"),
        sse({"type": "response.reasoning_summary_text.delta", "delta": "hmm "}),
        sse({"type": "response.output_text.delta", "delta": "Hi"}, "response.output_text.delta"),
        sse({"type": "response.output_text.delta", "delta": " there"}),
        sse({"type": "response.completed", "response": {"id": "r", "usage": {
            "input_tokens": 9, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 2},
            "output_tokens_details": {"reasoning_tokens": 3}}}}, "response.completed"),
    ]
    data = b"".join(events)
    out, sc = run(split_at(data, list(range(0, len(data), 13))), strip=False, family="responses")
    assert out == data
    assert sc.usage == Usage(9, 2, 7, 3)
    assert sc.saw_done
    assert sc.completion_text() == "hmm Hi there"


def test_anthropic_style_usages_combine() -> None:
    data = b"".join([
        sse({"type": "message_start", "message": {"id": "m", "usage": {
            "input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}},
            "message_start"),
        sse({"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "Hello"}}),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 15}}),
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ])
    for i in range(len(data) + 1):
        out, sc = run([data[:i], data[i:]], strip=False, family="anthropic")
        assert out == data
        assert sc.usage == Usage(30, 5, 15, 0), i
    assert sc.saw_done
    assert sc.completion_text() == "Hello"


def test_legacy_completions_text() -> None:
    data = sse({"choices": [{"text": "foo", "index": 0}]}) + \
        sse({"choices": [{"text": "bar", "index": 0}]}) + b"data: [DONE]\n\n"
    _, sc = run([data], strip=False)
    assert sc.completion_text() == "foobar"
    assert sc.usage is None
    assert sc.saw_done


def test_garbage_does_not_raise() -> None:
    junk = [b"data: {not json\n\n", b'data: {"usage":{"prompt_tokens":\n\n', b"\xff\xfe\n\n",
            b"data: [1,2]\n\n", b'data: {"choices":[1,{"delta":7}]}\n\n',
            b'data: {"choices":[{"delta":{"tool_calls":[3,{"function":1}]}}]}\n\n',
            b'data: {"usage":{"prompt_tokens":"x"}}\n\n', b"data: {\"choices\":[{\"delt"]
    for strip in (False, True):
        out, sc = run(junk, strip)
        assert out == b"".join(junk)
        assert sc.completion_text() == ""
        assert sc.usage in (None, Usage(0, 0, 0, 0))
        assert not sc.saw_done


def test_truncated_stream_text_and_cut_off_usage_event() -> None:
    data = stream(True)
    cut = data[: data.index(b"data: [DONE]") - 2]  # usage chunk lost its blank line
    out, sc = run([cut], strip=False)
    assert out == cut
    assert sc.usage == EXPECTED_USAGE
    assert not sc.saw_done
    half = data[: data.index(b"Hello") + 60]  # the Hello event and a bit more
    _, sc = run([half], strip=False)
    assert sc.usage is None
    assert sc.completion_text() == "thinkHello"


@pytest.mark.parametrize("strip", [False, True])
def test_long_stream_compacts_and_keeps_all_text(strip: bool) -> None:
    piece = "lorem ipsum dolor "
    ev = sse({"choices": [{"index": 0, "delta": {"content": piece}}], "usage": None})
    n = 3000  # ~ 300 KiB of events, several compactions
    sc = StreamScanner(strip_usage=strip)
    for _ in range(n):
        sc.feed(ev)
    assert sc._kept_len + sc._raw_len <= 64 * 1024 + len(ev)
    sc.finish()
    assert sc.completion_text() == piece * n
