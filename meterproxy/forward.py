"""The proxy route: a raw ASGI app (no Starlette request objects on the hot path).

Flow per request: prepare (route, auth, body, admission) → upstream request (meterproxy/transport/)
→ response headers → body: JSON answers are read whole and parsed for usage, SSE streams go chunk
by chunk through the scanner to `send` as they arrive → `settle` before the last byte (a JSON
body, a stream's final message), so a client's next request sees this one settled (docs/api.md
"Read-your-writes") → after it, `finish` writes the ledger record and the metrics.

Client disconnects are watched by one `receive()` future per request: when it reports
`http.disconnect` mid-request the handler task is cancelled, which closes the upstream response at
once (the provider stops generating), and metering still runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from time import perf_counter
from typing import Any

import orjson

from meterproxy.errors import ProxyError, send_error
from meterproxy.finish import finish, record_rejection, settle
from meterproxy.headers import client_request_id, ratelimit_headers, response_headers, upstream_headers
from meterproxy.metering.body import usage_in_json
from meterproxy.metering.scan import StreamScanner
from meterproxy.record import Call, Outcome
from meterproxy.request import ClientGone, prepare
from meterproxy.state import AppState
from meterproxy.transport import Response, TransportError

log = logging.getLogger("meterproxy")


async def _answer_failure(call: Call, send: Any, out: Outcome, err: TransportError) -> None:
    """The upstream failed before anything was sent to the client: the error's answer, counted
    under its kind."""
    out.status = err.status
    out.upstream_error = err.kind
    await send_error(send, err, call.request_id)
    out.complete = True


class ProxyRoute:
    """ASGI app for every provider path."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        state = self.state
        cfg = state.config  # one snapshot per request: a reload never changes rules mid-request
        try:
            call = await prepare(state, cfg, scope, receive)
        except ClientGone:
            return
        except ProxyError as err:
            # The refusal carries an x-request-id too (the client's if sane), the one logged.
            rid = client_request_id(scope["headers"]) or os.urandom(12).hex()
            record_rejection(state, cfg, scope, err, rid)
            await send_error(send, err, rid)
            return
        await self._forward(call, scope, receive, send)

    async def _forward(self, call: Call, scope: dict[str, Any], receive: Any, send: Any) -> None:
        state = self.state
        out = call.out
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(receive())

        def on_disconnect(fut: asyncio.Future[Any]) -> None:
            if not out.done and not fut.cancelled() and fut.exception() is None:
                out.client_gone = True
                if not out.settling:  # a settlement in flight finishes (its store call is bounded)
                    task.cancel()

        watcher.add_done_callback(on_disconnect)
        inflight = state.metrics.child(state.metrics.inflight, call.provider.name)
        inflight.inc()
        # Known to the lifespan, which waits for it before draining the ledger: a stream cut by the
        # end of the shutdown grace period is metered in the finally below (issue #7).
        state.tasks.add(task)
        try:
            await self._exchange(call, scope, send, out)
        except asyncio.CancelledError:
            if not out.client_gone:
                raise
            task.uncancel()
        finally:
            out.done = True
            if not watcher.done():
                watcher.cancel()
            resp = out.resp
            if resp is not None:
                if out.complete:
                    resp.release()
                else:
                    resp.close()  # unread body: drop the connection so the provider stops
            inflight.dec()
            try:
                await finish(state, call, out)
            finally:
                state.tasks.discard(task)

    async def _exchange(self, call: Call, scope: dict[str, Any], send: Any, out: Outcome) -> None:
        state = self.state
        provider = call.provider
        client = scope.get("client")
        target = call.raw_path + b"?" + call.query if call.query else call.raw_path
        headers = upstream_headers(scope["headers"], provider, client[0] if client else None,
                                   call.request_id, call.inject_usage)
        call.overhead += perf_counter() - call.t0
        out.sent_upstream = True
        server = call.cfg.server
        try:
            resp = await state.upstream.request(
                provider.origin, call.method, target, headers,
                call.body_bytes if call.body_bytes or call.method not in ("GET", "HEAD") else None,
                server.upstream_timeout_s, server.stream_idle_timeout_s)
        except TransportError as err:
            await _answer_failure(call, send, out, err)
            return
        out.resp = resp  # from here on the finally in _forward releases or closes it
        t_hdr = perf_counter()
        out.status = resp.status
        is_stream = (resp.header(b"content-type") or b"").startswith(b"text/event-stream")
        out.stream = is_stream
        hdrs = response_headers(resp.raw_headers, drop_length=is_stream and call.inject_usage)
        hdrs += ratelimit_headers(call.decision.snapshot if call.decision else None)
        hdrs.append((b"x-request-id", call.request_id.encode()))
        if is_stream:
            await self._stream(call, resp, send, out, hdrs, t_hdr)
        else:
            await self._whole(call, resp, send, out, hdrs, t_hdr)

    async def _whole(self, call: Call, resp: Response, send: Any, out: Outcome,
                     hdrs: list[tuple[bytes, bytes]], t_hdr: float) -> None:
        """A non-stream answer: read it, parse its usage and settle, then send it unchanged."""
        call.overhead += perf_counter() - t_hdr
        try:
            body = await resp.read()
        except TransportError as err:
            await _answer_failure(call, send, out, err)
            return
        t_body = perf_counter()
        out.complete = True
        # A run poll is a GET (not a metered path) but its finished result carries the run's
        # usage (issue #3: it was never parsed, so async runs were never metered).
        if (call.metered or call.poll_uid is not None) and 200 <= resp.status < 300 and body:
            try:
                out.json = orjson.loads(body)
            except orjson.JSONDecodeError:
                out.json = None
            out.usage = usage_in_json(out.json, call.family)
        call.overhead += perf_counter() - t_body
        await settle(self.state, call, out)  # before the last byte: read-your-writes
        await send({"type": "http.response.start", "status": resp.status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, call: Call, resp: Response, send: Any, out: Outcome,
                      hdrs: list[tuple[bytes, bytes]], t_hdr: float) -> None:
        """An SSE answer: every chunk to the client as it arrives, scanned for usage on the way,
        except the last: from the chunk that carries the final event ([DONE], message_stop,
        response.completed; SDKs act on it without waiting for the body's end) or that ends
        the body, the bytes are held until the settlement is sent (read-your-writes)."""
        scanner = StreamScanner(call.family, strip_usage=call.inject_usage)
        out.scanner = scanner
        await send({"type": "http.response.start", "status": resp.status, "headers": hdrs})
        now = perf_counter()
        call.overhead += now - t_hdr
        first = True
        scan_time = 0.0
        held: list[bytes] = []
        try:
            while True:
                chunk = await resp.readany()
                t_got = perf_counter()
                if not chunk:
                    break
                if first:
                    out.ttft = t_got - call.t0
                    first = False
                data = scanner.feed(chunk)
                scan_time += perf_counter() - t_got
                if held or scanner.saw_done or resp.done:
                    held.append(data)
                elif data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            out.complete = True
        except TransportError as err:  # broken, timed out, idle too long
            out.upstream_error = err.kind
            out.broken = True
        call.overhead += scan_time
        held.append(scanner.finish())
        rest = b"".join(held)
        out.usage = scanner.usage
        if out.broken:
            # The provider broke the stream (or it timed out): forward what came, then return
            # without completing the response, so uvicorn closes the connection without the final
            # chunk and the client sees a truncated stream, as if it were talking to the provider
            # (the openai SDK raises). Ending it cleanly made clients take a cut answer as whole.
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            return
        await settle(self.state, call, out)  # before the last byte: read-your-writes
        await send({"type": "http.response.body", "body": rest, "more_body": False})
