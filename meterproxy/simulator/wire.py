"""ASGI plumbing shared by every flavor: types, the per-request Call, stats, JSON and error answers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from meterproxy.simulator.plan import Knobs, Reply

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
JSON = dict[str, Any]
MAX_RUNS = 10_000            # async runs kept for polling; the oldest are forgotten first

_FINGERPRINT = "fp_sim0001"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache")]
_PROVIDER_HEADERS = [(b"x-ratelimit-limit-requests", b"9999"),
                     (b"x-ratelimit-remaining-requests", b"9998")]
_GARBAGE = (b"data: }{garbage\n\n",
            b'data: {"id":"chatcmpl-trunc","choices":[{"delta":{"content":"tru\n\n')
_DONE = b"data: [DONE]\n\n"


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
    cache_write: int = 0
    completion: int = 0
    reasoning: int = 0
    active: int = 0
    cancelled: int = 0

    def add(self, reply: Reply) -> None:
        self.prompt += reply.prompt
        self.cached += reply.cached
        self.cache_write += reply.cache_write
        self.completion += reply.completion
        self.reasoning += reply.reasoning

    def as_json(self) -> JSON:
        return {"requests": self.requests,
                "usage": {"prompt_tokens": self.prompt, "cached_prompt_tokens": self.cached,
                          "cache_write_tokens": self.cache_write,
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
    query: bytes = b""


Handler = Callable[[Call], Awaitable[None]]


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

