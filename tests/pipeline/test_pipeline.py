"""The request pipeline in process (request.py → forward.py → finish.py, admin.py, app.py): the
real app and its lifespan, a scripted provider on a loopback socket, every send() recorded with
its time (tests/pipeline/harness.py)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from tests.e2e.cluster import ADMIN_KEY, ENV, KEYS, make_config, write_config
from tests.pipeline.harness import Exchange, Harness, running
from tests.procs import free_port
from tests.transport.scripted import Reader, Request, Server, Writer

USAGE = {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}
CHAT = "/v1/chat/completions"


def auth(key_id: str = "alice-1") -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {KEYS[key_id][1]}".encode()), (b"content-type", b"application/json")]


def chat(stream: bool = False) -> bytes:
    return orjson.dumps({"model": "gpt-5.4", "max_tokens": 50, "stream": stream,
                         "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": "hi"}]})


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


async def provider(req: Request, reader: Reader, writer: Writer) -> None:
    """An OpenAI-shaped chat answer; a stream's events go out one write at a time, and its body
    ends 50 ms after [DONE] (as it may over a real network)."""
    stream = json.loads(req.body).get("stream")
    if not stream:
        body = orjson.dumps({"id": "c1", "object": "chat.completion", "usage": USAGE, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        return
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    events = [sse({"choices": [{"index": 0, "delta": {"content": "ok"}}]}),
              sse({"choices": [], "usage": USAGE}), sse(b"[DONE]")]
    for data in events:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    writer.write(b"0\r\n\r\n")


def silent(req: Request, reader: Reader, writer: Writer) -> Coroutine[Any, Any, None]:
    return asyncio.sleep(5)


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        (uvloop.run if request.param == "uvloop" else asyncio.run)(asyncio.wait_for(coro, 30))
    return runner


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    yield


def config(tmp_path: Path, port: int, **kw: Any) -> str:
    return str(write_config(tmp_path / "c.yaml", make_config(port, **kw)))


def assert_one_error(ex: Exchange, status: int, code: str) -> dict[str, Any]:
    """Exactly one well-formed error answer: a start and one final body, JSON of the SPEC shape."""
    assert [m["type"] for _, m in ex.sent] == ["http.response.start", "http.response.body"]
    assert ex.ended and ex.status == status
    assert ex.header(b"content-type") == b"application/json"
    assert ex.header(b"content-length") == str(len(ex.body)).encode()
    err = ex.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["code"] == code
    return dict(err)


def settled_at(h: Harness) -> float:
    times = [t for t, what in h.events if what == "settled"]
    assert len(times) == 1, h.events
    return times[0]


# --- read-your-writes ---------------------------------------------------------------------------

def test_json_answer_is_settled_before_it_is_sent(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with Server(provider) as srv, running(config(tmp_path, srv.port)) as h:
            ex = await h.request("POST", CHAT, auth(), chat())
            assert ex.status == 200 and ex.ended and ex.json()["usage"] == USAGE
            # the settlement reached the limiter before the first byte of the answer went out
            assert settled_at(h) < ex.sent[0][0]
    run(main())


def test_stream_holds_its_final_event_until_settled(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with Server(provider) as srv, running(config(tmp_path, srv.port)) as h:
            ex = await h.request("POST", CHAT, auth(), chat(stream=True))
            assert ex.status == 200 and ex.ended
            t_settled = settled_at(h)
            bodies = ex.bodies
            # content streams as it comes (not held)...
            first = next(t for t, m in bodies if b'"ok"' in m.get("body", b""))
            assert first < t_settled
            # ...but the message carrying [DONE] (SDKs act on it) and the body's end wait for it
            done = next(t for t, m in bodies if b"[DONE]" in m.get("body", b""))
            assert t_settled < done and t_settled < bodies[-1][0]
            assert ex.body.count(b"[DONE]") == 1 and b'"usage"' in ex.body
    run(main())


# --- errors: one well-formed answer each ----------------------------------------------------------

def test_proxy_errors_are_one_well_formed_answer(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with Server(provider) as srv, running(config(tmp_path, srv.port)) as h:
            assert_one_error(await h.request("POST", "/nowhere", auth(), chat()), 404, "unknown_route")
            assert_one_error(await h.request("POST", CHAT, [], chat()), 401, "invalid_api_key")
            assert_one_error(await h.request("POST", CHAT, auth(), b"{nope"), 400, "invalid_json")
            # the small endpoints answer through the same function
            err = assert_one_error(await h.request("GET", "/admin/usage", auth()), 403, "admin_required")
            assert err["type"] == "permission_error"
            ok = await h.request("GET", "/admin/usage", [(b"authorization", f"Bearer {ADMIN_KEY}".encode())])
            assert ok.status == 200
    run(main())


def test_unreachable_provider_is_a_502(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with running(config(tmp_path, free_port())) as h:
            ex = await h.request("POST", CHAT, auth(), chat())
            assert_one_error(ex, 502, "upstream_unreachable")
            assert ex.header(b"x-request-id")
            m = h.state.metrics.upstream_errors
            assert m.labels("sim", "connect")._value.get() == 1
    run(main())


def test_provider_silent_past_the_idle_timeout_is_a_504(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with Server(silent) as srv:
            cfg = config(tmp_path, srv.port, server={"stream_idle_timeout_s": 0.3})
            async with running(cfg) as h:
                t0 = time.monotonic()
                ex = await h.request("POST", CHAT, auth(), chat(stream=True))
                assert time.monotonic() - t0 < 3
                assert_one_error(ex, 504, "upstream_timeout")
                assert h.state.metrics.upstream_errors.labels("sim", "idle_timeout")._value.get() == 1
    run(main())


def test_budget_429_says_when_the_window_resets(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        keys = {"alice-1": {"limits": {"daily_tokens": 1}}, "bob-1": {"limits": {"monthly_tokens": 1}}}
        async with Server(provider) as srv, running(config(tmp_path, srv.port, keys=keys)) as h:
            for key, limit in (("alice-1", "daily"), ("bob-1", "monthly")):
                assert (await h.request("POST", CHAT, auth(key), chat())).status == 200  # spends it
                ex = await h.request("POST", CHAT, auth(key), chat())
                assert_one_error(ex, 429, "insufficient_quota")
                assert ex.header(b"x-should-retry") == b"false"
                now = datetime.now(UTC)
                if limit == "daily":
                    end = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
                else:
                    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
                expected = (end - now).total_seconds()
                retry_after = ex.header(b"retry-after")
                retry_ms = ex.header(b"retry-after-ms")
                assert retry_after is not None and retry_ms is not None
                assert abs(int(retry_after) - math.ceil(expected)) <= 2
                assert abs(int(retry_ms) / 1000 - expected) <= 2
    run(main())


def test_rejections_are_counted_under_their_key_authenticated_once(run: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from meterproxy import finish

    again: list[str] = []
    real = finish.authenticate
    monkeypatch.setattr(finish, "authenticate", lambda cfg, headers: again.append("x") or real(cfg, headers))

    async def main() -> None:
        async with Server(provider) as srv, running(config(tmp_path, srv.port)) as h:
            requests = h.state.metrics.requests
            await h.request("POST", CHAT, auth(), b"{nope")   # refused after authentication
            assert requests.labels("alice-1", "alice", "sim", "none", "400")._value.get() == 1
            assert again == []                                 # its principal came with it
            await h.request("POST", "/nowhere", auth(), chat())  # refused before authentication
            assert requests.labels("alice-1", "alice", "none", "none", "404")._value.get() == 1
            await h.request("POST", CHAT, [], chat())            # no key: nothing to count
            assert again == ["x"]
    run(main())


async def stalls_mid_stream(req: Request, reader: Reader, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    data = sse({"choices": [{"index": 0, "delta": {"content": "ok"}}]})
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()
    await asyncio.sleep(5)


def test_a_stream_silent_past_the_idle_timeout_is_cut(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with Server(stalls_mid_stream) as srv:
            cfg = config(tmp_path, srv.port, server={"stream_idle_timeout_s": 0.3})
            async with running(cfg) as h:
                t0 = time.monotonic()
                ex = await h.request("POST", CHAT, auth(), chat(stream=True))
                assert time.monotonic() - t0 < 3
                # what came is forwarded, then the answer is cut (not ended): the client sees a
                # truncated stream, as from the provider
                assert ex.status == 200 and b'"ok"' in ex.body and not ex.ended
                assert h.state.metrics.upstream_errors.labels("sim", "idle_timeout")._value.get() == 1
                settled_at(h)  # and its reservation was settled (by finish)
    run(main())


# --- pass-through and refusals ----------------------------------------------------------------------

async def models(req: Request, reader: Reader, writer: Writer) -> None:
    body = b'{"object":"list","data":[]}'
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))


def test_pass_through_is_counted_but_has_no_ledger_record(run: Any, tmp_path: Path) -> None:
    """SPEC flavors table: pass-through is not metered and has no ledger record (one was written,
    0 tokens marked source "provider"); a metered request next to it has exactly one."""
    async def main() -> None:
        async with Server(models) as srv, running(config(tmp_path, srv.port)) as h:
            ex = await h.request("GET", "/v1/models", auth())
            assert ex.status == 200 and ex.ended
            assert h.state.metrics.requests.labels("alice-1", "alice", "sim", "none", "200")._value.get() == 1
            assert await h.state.ledger.drain(5)
            assert (await h.state.ledger.records(None, 10))["records"] == []
    run(main())


def test_a_refusal_carries_the_request_id_it_was_logged_under(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with running(config(tmp_path, free_port())) as h:
            mine = await h.request("POST", CHAT, [(b"x-request-id", b"client-rid-1")], chat())
            assert_one_error(mine, 401, "invalid_api_key")
            assert mine.header(b"x-request-id") == b"client-rid-1"
            ours = await h.request("POST", "/nowhere", auth(), chat())
            assert_one_error(ours, 404, "unknown_route")
            assert len(ours.header(b"x-request-id") or b"") == 24   # the proxy's own id
    run(main())
