"""Metering is exact whatever the chunking (docs/api.md, metering rules): every recorded stream of
the corpus (tests/fixtures/streams/, shaped as each provider sends it), split at random points
down to one byte per read, gives the same usage, the same text and the same output bytes, with
and without include_usage injection (strip mode drops only the usage-only chunk it caused)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproxy.metering.scan import StreamScanner
from meterproxy.metering.usage import Usage

CORPUS = Path(__file__).parent / "fixtures" / "streams"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())
NAMES = sorted(EXPECTED)


def load(name: str) -> bytes:
    return (CORPUS / f"{name}.sse").read_bytes()


def want_usage(name: str) -> Usage:
    p, c, comp, r, w, cost = EXPECTED[name]["usage"]
    return Usage(p, c, comp, r, "provider", w, cost)


def want_stripped(name: str) -> bytes:
    """The oracle: the stream without the events listed in `drop` (the usage-only chunks)."""
    data = load(name)
    events = re.findall(rb".*?(?:\r\n\r\n|\n\n)", data, re.S)
    assert b"".join(events) == data
    return b"".join(ev for i, ev in enumerate(events) if i not in EXPECTED[name]["drop"])


def run(name: str, chunks: list[bytes], strip: bool) -> tuple[bytes, StreamScanner]:
    sc = StreamScanner(EXPECTED[name]["family"], strip_usage=strip)
    out = [sc.feed(c) for c in chunks]
    out.append(sc.finish())
    return b"".join(out), sc


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in reads of the given sizes, cycled."""
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i:i + n])
        i += n
        k += 1
    return out


def test_corpus_covers_every_family_and_provider() -> None:
    assert {"openai", "azure", "deepseek", "groq", "mistral", "openrouter", "vllm", "llamacpp",
            "together", "xai", "responses", "anthropic", "gemini"} <= set(NAMES)
    assert {e["family"] for e in EXPECTED.values()} == {"chat", "responses", "anthropic", "gemini"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strip", [False, True])
def test_whole_stream(name: str, strip: bool) -> None:
    out, sc = run(name, [load(name)], strip)
    assert out == (want_stripped(name) if strip else load(name))
    assert sc.usage == want_usage(name)
    assert sc.completion_text() == EXPECTED[name]["text"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strip", [False, True])
def test_one_byte_per_read(name: str, strip: bool) -> None:
    data = load(name)
    out, sc = run(name, cut(data, [1]), strip)
    assert out == (want_stripped(name) if strip else data)
    assert sc.usage == want_usage(name)
    assert sc.completion_text() == EXPECTED[name]["text"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NAMES), st.booleans(), st.lists(st.integers(1, 80), min_size=1, max_size=20))
def test_random_reads(name: str, strip: bool, sizes: list[int]) -> None:
    data = load(name)
    out, sc = run(name, cut(data, sizes), strip)
    assert out == (want_stripped(name) if strip else data)
    assert sc.usage == want_usage(name)
    assert sc.completion_text() == EXPECTED[name]["text"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NAMES), st.lists(st.integers(0, 6000), max_size=12))
def test_random_cut_points_passthrough_returns_each_chunk(name: str, points: list[int]) -> None:
    data = load(name)
    bounds = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    sc = StreamScanner(EXPECTED[name]["family"])
    for c in chunks:
        assert sc.feed(c) is c          # pass-through never copies or changes a byte
    assert sc.finish() == b""
    assert sc.usage == want_usage(name)
