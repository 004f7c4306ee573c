"""Micro-benchmark of StreamScanner: microseconds per chunk over a 50-chunk chat stream.

Run: .venv/bin/python bench/scan_micro.py
Compares a bare loop (the floor: a call that returns its argument) with the scanner in
pass-through mode (client asked for usage: every chunk carries "usage":null) and in
strip mode (proxy-added include_usage removed), plus the cost of completion_text() and of
events split across small reads (the incremental decoder's path).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from meterproxy.metering.scan import StreamScanner

N_CHUNKS = 50
REPEAT = 2000


def chat_stream() -> list[bytes]:
    """A realistic include_usage chat stream: one SSE event per network chunk."""
    head = {"id": "chatcmpl-AbC123xyz", "object": "chat.completion.chunk",
            "created": 1730000000, "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_abc123"}
    words = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog.")
    chunks = []
    for i in range(N_CHUNKS - 2):
        delta = {"content": words[i % len(words)]} if i else {"role": "assistant", "content": ""}
        obj = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": None}], "usage": None}
        chunks.append(b"data: " + orjson.dumps(obj) + b"\n\n")
    usage = {"prompt_tokens": 120, "completion_tokens": 48, "total_tokens": 168,
             "prompt_tokens_details": {"cached_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0}}
    chunks.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def per_chunk_us(run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(REPEAT):
            run()
        best = min(best, time.perf_counter() - t)
    return best / REPEAT / N_CHUNKS * 1e6


def main() -> None:
    chunks = chat_stream()

    def bare() -> None:
        f = _identity
        for c in chunks:
            f(c)

    def scanner(strip: bool) -> Callable[[], None]:
        def go() -> None:
            sc = StreamScanner(strip_usage=strip)
            feed = sc.feed
            for c in chunks:
                feed(c)
            sc.finish()
            assert sc.usage is not None
        return go

    def with_text() -> None:
        sc = StreamScanner(strip_usage=False)
        for c in chunks:
            sc.feed(c)
        sc.finish()
        sc.completion_text()

    print(f"{N_CHUNKS}-chunk chat stream, {sum(map(len, chunks))} bytes; µs per chunk:")
    print(f"  bare loop (identity call)      {per_chunk_us(bare):6.2f}")
    print(f"  scanner, pass-through          {per_chunk_us(scanner(False)):6.2f}")
    print(f"  scanner, strip include_usage   {per_chunk_us(scanner(True)):6.2f}")
    print(f"  pass-through + completion_text {per_chunk_us(with_text):6.2f}  (only when no usage)")
    # TCP may cut events anywhere: reads of 64 bytes (~4 per event) go through the SSE decoder.
    small = [c for whole in chunks for c in (whole[i:i + 64] for i in range(0, len(whole), 64))]

    def split_reads() -> None:
        sc = StreamScanner(strip_usage=False)
        for c in small:
            sc.feed(c)
        sc.finish()
        assert sc.usage is not None

    us = per_chunk_us(split_reads) * len(chunks) / len(small)
    print(f"  pass-through, 64-byte reads    {us:6.2f}  (per read; {len(small)} reads)")


def _identity(c: bytes) -> bytes:
    return c


if __name__ == "__main__":
    main()
