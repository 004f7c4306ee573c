"""Planning an answer: fault knobs from x-sim-* headers, choices, and their honest usage."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from meterproxy.simulator.tokens import (
    _joined,
    _seed,
    count_tokens,
    encoding_for,
    is_reasoning_model,
    prompt_tokens,
    words,
)

JSON = dict[str, Any]

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-5.4", "o3-mini", "gpt-3.5-turbo", "text-embedding-3-small",
          "openai/gpt-4o", "openai/o3-mini", "anthropic/claude-sonnet-4")
DEFAULT_LENGTH = 40          # completion words (= tokens) when the request sets no smaller cap
_REASONING_WORDS = {"minimal": 4, "low": 8, "medium": 16, "high": 32}


@dataclass(slots=True)
class Knobs:
    """Fault and shape knobs, read from `x-sim-*` request headers."""

    chunk_delay: float = 0.0      # x-sim-chunk-delay-ms (s); default from the server
    first_delay: float = 0.0      # x-sim-first-token-delay-ms (s)
    status: int = 0               # x-sim-status: answer this error status
    omit_usage: bool = False      # x-sim-omit-usage: never send usage
    break_after: int = -1         # x-sim-break-after: abort the stream after K events
    garbage: bool = False         # x-sim-garbage: junk events, no [DONE]
    bad_json: bool = False        # x-sim-bad-json: body that is not JSON
    empty: bool = False           # x-sim-empty: 200 with no body
    chunks: int = 0               # x-sim-chunks: exactly N content chunks
    cached: int = 0               # x-sim-cached-tokens: report this many cached prompt tokens
    cache_write: int = 0          # x-sim-cache-write-tokens: this many prompt tokens written to the cache


def _num(v: bytes) -> float:
    try:
        f = float(v)
    except ValueError:
        return 0.0
    return f if math.isfinite(f) and f > 0 else 0.0


def _knobs(raw: dict[bytes, bytes], default_delay: float) -> Knobs:
    k = Knobs(chunk_delay=default_delay)
    if not raw:
        return k
    if b"x-sim-chunk-delay-ms" in raw:
        k.chunk_delay = _num(raw[b"x-sim-chunk-delay-ms"]) / 1000
    k.first_delay = _num(raw.get(b"x-sim-first-token-delay-ms", b"0")) / 1000
    k.status = int(_num(raw.get(b"x-sim-status", b"0")))
    k.break_after = int(_num(raw[b"x-sim-break-after"])) if b"x-sim-break-after" in raw else -1
    k.chunks = min(int(_num(raw.get(b"x-sim-chunks", b"0"))), 100_000)
    k.cached = int(_num(raw.get(b"x-sim-cached-tokens", b"0")))
    k.cache_write = int(_num(raw.get(b"x-sim-cache-write-tokens", b"0")))
    flag = {name for name, v in raw.items() if v.strip() not in (b"", b"0", b"false")}
    k.omit_usage = b"x-sim-omit-usage" in flag
    k.garbage = b"x-sim-garbage" in flag
    k.bad_json = b"x-sim-bad-json" in flag
    k.empty = b"x-sim-empty" in flag
    return k


@dataclass(slots=True)
class Choice:
    """What one choice says: reasoning pieces, then either content pieces or one tool call."""

    reasoning: tuple[str, ...]
    content: tuple[str, ...]
    tool_name: str = ""
    tool_id: str = ""
    tool_args: tuple[str, ...] = ()
    finish: str = "stop"


@dataclass(slots=True)
class Reply:
    """A whole planned answer and its honest usage."""

    model: str
    choices: list[Choice]
    prompt: int
    cached: int
    completion: int = 0
    reasoning: int = 0
    cache_write: int = 0

    def usage(self, extra: JSON | None = None) -> JSON:
        u: JSON = {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                   "total_tokens": self.prompt + self.completion,
                   "prompt_tokens_details": {"cached_tokens": self.cached},
                   "completion_tokens_details": {"reasoning_tokens": self.reasoning}}
        if extra:
            u.update(extra)
        return u


def _length(body: JSON, *names: str) -> tuple[int, bool]:
    """Completion length in tokens and whether the client's own cap set it."""
    for name in names:
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool):
            return (max(v, 1), True) if v <= DEFAULT_LENGTH else (DEFAULT_LENGTH, False)
    return DEFAULT_LENGTH, False


def _pick_tool(tools: Any, tool_choice: Any) -> tuple[str, JSON] | None:
    """The tool to call: the one tool_choice names, else the first; None when no call is due."""
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    wanted = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        wanted = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
        name = spec.get("name")
        if isinstance(name, str) and wanted in (None, name):
            params = spec.get("parameters")
            return name, params if isinstance(params, dict) else {}
    return None


def _tool_args(params: JSON, seed: int) -> tuple[str, ...]:
    """A JSON arguments string filling the schema's properties, split into several deltas."""
    props = params.get("properties")
    if not isinstance(props, dict) or not props:
        props = {"input": {"type": "string"}}
    args: JSON = {}
    for i, key in enumerate(list(props)[:4]):
        spec = props[key]
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind in ("integer", "number"):
            args[key] = (seed >> i) % 100
        elif kind == "boolean":
            args[key] = bool((seed >> i) & 1)
        else:
            args[key] = _joined(words(seed + i, 3))
    text = orjson.dumps(args).decode()
    step = max(len(text) // 4, 1)
    return tuple(text[i:i + step] for i in range(0, len(text), step))


def plan_chat(body: JSON, knobs: Knobs, n: int = 0) -> Reply:
    """Plan a chat completion (n choices) for a request body, with its usage."""
    model = str(body.get("model") or "gpt-4o")
    enc = encoding_for(model)
    messages, tools = body.get("messages"), body.get("tools")
    prompt = prompt_tokens(messages, tools, enc)
    length, capped = _length(body, "max_completion_tokens", "max_tokens")
    if knobs.chunks:
        length, capped = knobs.chunks, False
    n = n or (body["n"] if isinstance(body.get("n"), int) and body["n"] > 1 else 1)
    think = _REASONING_WORDS.get(str(body.get("reasoning_effort")), 16) \
        if is_reasoning_model(model) else 0
    tool = _pick_tool(tools, body.get("tool_choice"))
    base = _seed(messages) ^ zlib.crc32(model.encode())
    reply = Reply(model, [], prompt, min(knobs.cached, prompt))
    for i in range(min(n, 128)):
        seed = base + i * 7919
        ch = Choice(words(seed + 1, think) if think else (), ())
        if tool:
            ch.tool_name, ch.tool_id = tool[0], f"call_{seed & 0xFFFFFFFF:08x}{i:04d}"
            ch.tool_args, ch.finish = _tool_args(tool[1], seed), "tool_calls"
            out = count_tokens(_joined(ch.tool_args), enc) + count_tokens(ch.tool_name, enc)
        else:
            ch.content = words(seed, length)
            ch.finish = "length" if capped else "stop"
            out = count_tokens(_joined(ch.content), enc)
        r = count_tokens(_joined(ch.reasoning), enc) if think else 0
        reply.completion += out + r
        reply.reasoning += r
        reply.choices.append(ch)
    return reply

