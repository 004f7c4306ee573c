"""An in-process ASGI harness that records every message the app sends, with its time.

Unlike Starlette's TestClient or httpx's ASGITransport it buffers nothing: each `send()` is kept
as it happened, so a test can say what was sent when — e.g. that the settlement reached the
limiter before the answer's last body message. The app is the real one (`create_app`), its
lifespan run through the ASGI lifespan protocol; only the client side is simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import orjson

from meterproxy.app import MeterProxy
from meterproxy.state import AppState


@dataclass
class Exchange:
    """One request's sent messages, in order, each with its perf_counter() time."""

    sent: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def start(self) -> dict[str, Any]:
        starts = [m for _, m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"{len(starts)} response starts"
        return starts[0]

    @property
    def status(self) -> int:
        status: int = self.start["status"]
        return status

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.start["headers"] if k == name), None)

    @property
    def bodies(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.sent if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for _, m in self.bodies)

    @property
    def ended(self) -> bool:
        """The last message ends the response (more_body false) and nothing follows it."""
        bodies = self.bodies
        return bool(bodies) and not bodies[-1][1].get("more_body", False) and self.sent[-1] == bodies[-1]

    def json(self) -> Any:
        return orjson.loads(self.body)


class Harness:
    def __init__(self, app: MeterProxy) -> None:
        self.app = app
        self.events: list[tuple[float, str]] = []   # what the test hooks saw (e.g. settlements)
        self._lifespan: asyncio.Task[None] | None = None
        self._life_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._life_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @property
    def state(self) -> AppState:
        state: AppState = self.app.starlette.state.mp
        return state

    async def __aenter__(self) -> Harness:
        async def receive() -> dict[str, Any]:
            return await self._life_in.get()

        async def send(msg: dict[str, Any]) -> None:
            await self._life_out.put(msg)

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.ensure_future(self.app(scope, receive, send))
        await self._life_in.put({"type": "lifespan.startup"})
        msg = await asyncio.wait_for(self._life_out.get(), 10)
        assert msg["type"] == "lifespan.startup.complete", msg
        self._record_settlements()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._life_in.put({"type": "lifespan.shutdown"})
        assert self._lifespan is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._lifespan, 10)

    def _record_settlements(self) -> None:
        """Note when each settlement has been handed to the (real) limiter."""
        limiter = self.state.limiter
        settle = limiter.settle

        async def recorded(*args: Any) -> None:
            await settle(*args)
            self.events.append((perf_counter(), "settled"))

        limiter.settle = recorded  # type: ignore[method-assign,assignment]

    async def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None,
                      body: bytes = b"", *, disconnect: asyncio.Event | None = None) -> Exchange:
        """Run one request to completion. `disconnect`, when set, makes the client leave."""
        ex = Exchange()
        path, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "headers": [(b"host", b"proxy"), *(headers or [])], "client": ("127.0.0.1", 50000),
                 "server": ("127.0.0.1", 8080), "root_path": ""}
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            if disconnect is not None:
                await disconnect.wait()
            else:
                await asyncio.Event().wait()  # a client that stays until the answer ends
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            ex.sent.append((perf_counter(), msg))

        await asyncio.wait_for(self.app(scope, receive, send), 10)
        return ex


@contextlib.asynccontextmanager
async def running(config_path: str) -> AsyncIterator[Harness]:
    from meterproxy.app import create_app

    async with Harness(create_app(config_path)) as h:
        yield h
