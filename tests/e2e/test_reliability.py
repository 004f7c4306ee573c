"""Issue #7, reliability: nothing lost under faults, shutdown and load; memory stays bounded.

Real processes only: `meterproxy simulate`, `meterproxy serve` and redis-server (with AOF, so a
killed Redis keeps what it acknowledged, as production should run it), over loopback sockets.
The truth for "no usage lost" is the simulator's own count of what it served (GET /_sim/stats),
compared with the ledger read back through the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from meterproxy.ledger import open_ledger_store
from tests.e2e.cluster import KEYS, bearer, make_config, proxy, write_config
from tests.e2e.load import (
    ADMIN,
    MSG,
    USAGE_FIELDS,
    Result,
    Shape,
    ledger_records,
    ledger_total,
    metric,
    mixed_shapes,
    record_for,
    rss_mb,
    run_load,
    sim_stats,
    stream_complete,
    wait_for,
)
from tests.e2e.receiver import Receiver
from tests.procs import PostgresServer, Proc, RedisServer, free_port, simulator

CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of its own (tests stop and restart it) for the ledger."""
    pg = PostgresServer().start()
    try:
        yield pg
    finally:
        pg.cleanup()


@contextlib.contextmanager
def aof_redis(fsync: str = "always") -> Iterator[RedisServer]:
    """A redis-server of its own (tests kill it) with AOF on, as the README asks for production.
    fsync "always": even a SIGKILLed Redis keeps every write it acknowledged."""
    rs = RedisServer(extra=["--appendonly", "yes", "--appendfsync", fsync]).start()
    try:
        yield rs
    finally:
        rs.cleanup()


def _assert_totals_match(sim_base: str, ledger: dict[str, Any], requests: int) -> None:
    stats = sim_stats(sim_base)
    assert stats["requests"] == requests, stats
    assert ledger["requests"] == requests, ledger
    for f in USAGE_FIELDS:
        assert ledger[f] == stats["usage"][f], (f, ledger, stats)
    assert stats["usage"]["completion_tokens"] > 0 and stats["usage"]["reasoning_tokens"] > 0
    assert stats["usage"]["cached_prompt_tokens"] > 0


def _wait_backlog_empty(*procs: Proc, timeout: float = 30.0) -> float:
    return wait_for(lambda: all(metric(p.base, "meterproxy_usage_backlog") == 0 for p in procs),
                    timeout, "the usage backlog to drain", step=0.1)


# --- no usage lost ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_usage_lost_two_proxies_one_sqlite_ledger(tmp_path: Path) -> None:
    """2,000 mixed requests (streams and not, every flavor) at concurrency 100 through two proxy
    processes on one Redis, sharing the default SQLite ledger (the file beside their config, as
    `--workers 2` would): the ledger equals the simulator's totals exactly."""
    total, conc = 2000, 100
    with aof_redis() as rs, simulator() as sim:
        path = write_config(tmp_path / "c.yaml", make_config(sim.port, store_url=rs.url, on_error="open"))
        with proxy(path) as a, proxy(path) as b:
            t0 = time.monotonic()
            results = asyncio.run(run_load([a.base, b.base], total, conc, mixed_shapes()))
            elapsed = time.monotonic() - t0
            bad = [(s.path, r.status, r.error, r.body[-120:]) for s, r in results
                   if r.status != 200 or not stream_complete(s, r.body)]
            assert not bad, (len(bad), bad[:5])
            assert len(results) == total
            _wait_backlog_empty(a, b)
            _assert_totals_match(sim.base, ledger_total(a.base), total)
            assert ledger_total(b.base) == ledger_total(a.base)
            recs = ledger_records(a.base)
            assert len(recs) == total and len({r["request_id"] for r in recs}) == total
            assert {r["status"] for r in recs} == {200} and {r["source"] for r in recs} == {"provider"}
            print(f"\n{total} requests in {elapsed:.1f}s on one SQLite ledger")


@pytest.mark.slow
def test_fleet_two_proxies_postgres_and_redis_restarts(tmp_path: Path) -> None:
    """Issue #10's fleet: two proxies, one PostgreSQL ledger, one Redis, a cloudevents exporter;
    2,000 mixed requests (streams, tools, estimates) with PostgreSQL restarted (crash: immediate
    stop) and Redis killed and restarted in the middle, on_error open. Exactly one record per
    answered request; the aggregates equal the sum of the records exactly (tokens and nano-USD);
    the receiver got every record id, none missing, first deliveries in record order."""
    total, conc = 2000, 100
    rx = Receiver()
    try:
        with aof_redis() as rs, simulator() as sim, postgres() as pg:
            cfg = make_config(sim.port, store_url=rs.url, on_error="open", ledger={
                "url": pg.new_database(),
                "export": [{"type": "cloudevents", "url": rx.url, "batch_size": 500}]})
            path = write_config(tmp_path / "c.yaml", cfg)
            with proxy(path) as a, proxy(path) as b:
                delay = {"x-sim-chunk-delay-ms": "10"}   # each outage spans ~1 s of traffic
                shapes = [Shape(s.path, s.body, s.stream, {**s.headers, **delay}, s.key_header)
                          for s in mixed_shapes()]
                shapes.append(Shape(CHAT, {"model": "gpt-5.4", "messages": MSG}, False,
                                    {"x-sim-omit-usage": "1"}))   # estimated usage
                plan = {300: "pg_stop", 700: "pg_start", 1100: "redis_stop", 1500: "redis_start"}
                seen_backlog: list[float] = []

                async def on_done(n: int) -> None:
                    action = plan.pop(n, None)
                    if action == "pg_stop":
                        await asyncio.to_thread(pg.stop, "immediate")
                    elif action == "pg_start":
                        seen_backlog.append(await asyncio.to_thread(
                            lambda: metric(a.base, "meterproxy_usage_backlog")
                            + metric(b.base, "meterproxy_usage_backlog")))
                        await asyncio.to_thread(pg.start)
                    elif action == "redis_stop":
                        await asyncio.to_thread(rs.stop)
                    elif action == "redis_start":
                        await asyncio.to_thread(rs.start)

                results = asyncio.run(run_load([a.base, b.base], total, conc, shapes, on_done=on_done))
                bad = [(s.path, r.status, r.error, r.body[-120:]) for s, r in results
                       if r.status != 200 or not stream_complete(s, r.body)]
                assert not bad, (len(bad), bad[:5])
                _wait_backlog_empty(a, b, timeout=60)
                assert seen_backlog and seen_backlog[0] > 0   # the PostgreSQL outage queued records
                assert metric(a.base, "meterproxy_ledger_writes_total", {"result": "error"}) \
                    + metric(b.base, "meterproxy_ledger_writes_total", {"result": "error"}) > 0
                recs = ledger_records(a.base)
                answered = {r.request_id for _, r in results}
                assert len(recs) == total == len(answered)
                assert sorted(r["request_id"] for r in recs) == sorted(answered)   # one each
                assert {r["source"] for r in recs} == {"provider", "estimated"}
                # aggregates == the sum of the records, exactly, in total and per group
                fields = (*USAGE_FIELDS, "cost_nano")
                agg = ledger_total(a.base)
                assert agg["requests"] == total
                for f in fields:
                    assert agg[f] == sum(r[f] for r in recs), f
                rows = httpx.get(f"{a.base}/admin/usage", params={"group_by": "key,model"},
                                 headers=ADMIN, timeout=10).json()["rows"]
                for row in rows:
                    mine = [r for r in recs if (r["key"], r["model"]) == (row["key"], row["model"])]
                    assert row["requests"] == len(mine)
                    assert all(row[f] == sum(r[f] for r in mine) for f in fields), row
                # the exporter: every id delivered, none missing, none unknown
                ids = [r["id"] for r in recs]
                wait_for(lambda: {e["id"] for e in rx.events} >= set(ids), 60, "every record exported")
                first = list(dict.fromkeys(e["id"] for e in rx.events))
                assert sorted(first, key=int) == first and set(first) == set(ids)
                print(f"\nfleet: {total} requests; backlog at PostgreSQL restart {seen_backlog}; "
                      f"{len(rx.events)} events delivered for {total} records")
    finally:
        rx.close()


@pytest.mark.slow
def test_sigterm_mid_run_finishes_streams_flushes_backlog_exits_0(tmp_path: Path) -> None:
    """SIGTERM one of two proxies mid-run, while the PostgreSQL ledger is down: it stops accepting
    at once, finishes its in-flight streams, waits for the ledger within the grace period, writes
    its backlog and exits 0. Requests it no longer accepted go to the other proxy (as a load balancer
    would); the ledger holds every request either answered, equal to the simulator's totals."""
    grace = 10.0
    total, conc = 800, 60
    with aof_redis() as rs, simulator() as sim, postgres() as pg:
        cfg = make_config(sim.port, store_url=rs.url, server={"shutdown_grace_s": grace},
                          ledger={"url": pg.new_database()})
        path = write_config(tmp_path / "c.yaml", cfg)
        with proxy(path) as a, proxy(path) as b:
            # Streams of ~0.5 s, so SIGTERM always finds some in flight.
            shapes = [Shape(s.path, s.body, s.stream, {**s.headers, "x-sim-chunk-delay-ms": "40"},
                            s.key_header) for s in mixed_shapes(chunks=10)]
            info: dict[str, Any] = {}

            def restart_ledger_later() -> None:
                time.sleep(1.5)
                pg.start()
                info["ledger_back"] = time.monotonic()

            def watch_exit() -> None:
                info["rc"] = a.proc.wait(grace + 10)
                info["t_exit"] = time.monotonic() - info["t_term"]

            async def on_done(n: int) -> None:
                if n == 150:
                    await asyncio.to_thread(pg.stop, "immediate")
                elif n == 300:
                    info["inflight"] = await asyncio.to_thread(
                        metric, a.base, "meterproxy_inflight_requests")
                    info["backlog"] = await asyncio.to_thread(metric, a.base, "meterproxy_usage_backlog")
                    info["t_term"] = time.monotonic()
                    a.signal(signal.SIGTERM)
                    threading.Thread(target=restart_ledger_later, daemon=True).start()
                    threading.Thread(target=watch_exit, daemon=True).start()

            def elsewhere(res: Result) -> str | None:
                # No answer at all from the stopping proxy: the request never reached it.
                return b.base if res.base == a.base and "t_term" in info else None

            results = asyncio.run(run_load(lambda i: a.base if i % 2 else b.base, total, conc,
                                           shapes, prefix="t", on_done=on_done,
                                           retry_refused=elsewhere))
            wait_for(lambda: "t_exit" in info, grace + 10, "the SIGTERMed proxy to exit")
            t_exit = info["t_exit"]
            assert info["rc"] == 0, a.output()[-3000:]
            assert info["inflight"] > 0 and info["backlog"] > 0, info
            # It exited within the grace period, after the ledger came back and took its backlog.
            assert t_exit < grace, t_exit
            assert 1.5 <= info["ledger_back"] - info["t_term"] < t_exit
            bad = [(s.path, r.base, r.status, r.error) for s, r in results
                   if r.status != 200 or not stream_complete(s, r.body)]
            assert not bad, (len(bad), bad[:5])
            answered_by_a = {r.request_id for _, r in results if r.base == a.base}
            after_term = sum(1 for _, r in results if r.base == b.base and int(r.request_id[2:]) % 2)
            assert after_term > 0  # some of A's share went to B after the SIGTERM
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{a.base}/healthz", timeout=2)
            _wait_backlog_empty(b)
            recs = ledger_records(b.base)
            ids = {r["request_id"] for r in recs}
            assert answered_by_a <= ids, len(answered_by_a - ids)
            assert len(recs) == total == len(ids)
            _assert_totals_match(sim.base, ledger_total(b.base), total)
            log = a.output()
            assert "could not be written" not in log and "unwritten" not in log
            print(f"\nA answered {len(answered_by_a)}, {info['inflight']:.0f} in flight and backlog "
                  f"{info['backlog']:.0f} at SIGTERM, exited 0 after {t_exit:.2f}s (grace {grace}s)")


def test_sigterm_ends_a_stream_longer_than_grace_and_still_meters_it(tmp_path: Path, redis_url: str) -> None:
    """A 10 s stream against shutdown_grace_s 1.5: new connections are refused from the moment of
    SIGTERM, the stream is ended when the grace period runs out (no [DONE]), it is metered by
    estimate into the ledger, and the process exits 0 within ~2 s."""
    with simulator() as sim:
        cfg = make_config(sim.port, store_url=redis_url, server={"shutdown_grace_s": 1.5})
        path = write_config(tmp_path / "c.yaml", cfg)
        with proxy(path) as px:
            h = {**bearer("alice-1"), "x-sim-chunk-delay-ms": "100", "x-sim-chunks": "100",
                 "x-request-id": "cut-by-grace"}
            got = bytearray()

            def read() -> None:
                with contextlib.suppress(httpx.HTTPError), httpx.stream(
                        "POST", px.base + CHAT, headers=h, timeout=30,
                        json={"model": "gpt-5.4", "messages": MSG, "stream": True}) as r:
                    for chunk in r.iter_raw():
                        got.extend(chunk)

            t = threading.Thread(target=read)
            t.start()
            wait_for(lambda: len(got) > 0, 5, "the stream to start")
            t0 = time.monotonic()
            px.signal(signal.SIGTERM)
            wait_for(lambda: _refused(px.port), 1.0, "the listener to close")
            rc = px.proc.wait(10)
            took = time.monotonic() - t0
            t.join(5)
            assert rc == 0, px.output()[-2000:]
            assert 1.4 < took < 4.0, took    # ended by the grace period, not run to its 10 s end
            assert b"[DONE]" not in got and got.count(b"data: {") >= 10
    async def read_ledger() -> list[Any]:   # the default ledger: SQLite beside the config
        store = open_ledger_store(f"sqlite://{tmp_path / 'meterproxy-ledger.db'}")
        try:
            return [r for _, r in await store.records(0, 1000) if r.request_id == "cut-by-grace"]
        finally:
            await store.close()

    recs = asyncio.run(read_ledger())
    assert len(recs) == 1 and recs[0].source == "estimated" and recs[0].completion_tokens >= 10


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return True
    return False


def test_store_hiccup_at_settlement_does_not_hold_leases(tmp_path: Path) -> None:
    """Redis freezes (SIGSTOP) for 1.5 s exactly when two streams of a key with concurrency 2 end:
    their settlements time out. Settlement is idempotent, so it is retried once the store answers:
    the key's leases are released within seconds, not held for lease_ttl_s (15 min), and the key
    can run two requests at once again."""
    with aof_redis("everysec") as rs, simulator() as sim:
        cfg = make_config(sim.port, store_url=rs.url, keys={"alice-1": {"limits": {"concurrency": 2}}})
        with proxy(write_config(tmp_path / "c.yaml", cfg)) as px:
            h = {**bearer("alice-1"), "x-sim-chunk-delay-ms": "100", "x-sim-chunks": "6"}
            body = {"model": "gpt-5.4", "messages": MSG, "stream": True}

            def stream(_: int) -> int:
                with httpx.stream("POST", px.base + CHAT, headers=h, json=body, timeout=30) as r:
                    b"".join(r.iter_raw())
                    return r.status_code

            assert rs.proc is not None
            with ThreadPoolExecutor(2) as pool:
                codes = pool.map(stream, range(2))
                time.sleep(0.4)                 # both admitted, both streaming
                rs.proc.send_signal(signal.SIGSTOP)
                assert list(codes) == [200, 200]
            time.sleep(0.5)
            rs.proc.send_signal(signal.SIGCONT)
            assert metric(px.base, "meterproxy_store_errors_total", {"operation": "settle"}) >= 1
            r = redis.Redis.from_url(rs.url)
            wait_for(lambda: r.zcard("mp:{u:alice}:k:alice-1:c") == 0, 10, "the leases to be released")
            with ThreadPoolExecutor(2) as pool:
                assert list(pool.map(stream, range(2))) == [200, 200]


# --- upstream faults -------------------------------------------------------------------------------

class Blackhole:
    """A listening socket whose accept queue is full and never drained: a connect to it hangs
    (the SYN is dropped), like a firewalled host — locally, without any network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self.fillers: list[socket.socket] = []
        for _ in range(3):    # fill the queue; later connects time out
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            with pytest.raises(OSError):
                probe.connect(("127.0.0.1", self.port))
        finally:
            probe.close()

    def close(self) -> None:
        for s in [*self.fillers, self.sock]:
            s.close()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    """Simulator + one proxy (in-process store) with extra providers that cannot be reached:
    connection refused, DNS failure, connect timeout. upstream_timeout_s 2 s for the read timeout."""
    tmp = tmp_path_factory.mktemp("faults")
    hole = Blackhole()
    dead = free_port()
    with simulator() as sim:
        cfg = make_config(sim.port, server={"upstream_timeout_s": 2.0, "connect_timeout_s": 0.5})
        auth = {"header": "Authorization", "value": "Bearer ${SIM_OPENAI_KEY}"}
        cfg["providers"].update({
            "refused": {"base_url": f"http://127.0.0.1:{dead}", "paths": ["/refused/"], "auth": auth},
            "nodns": {"base_url": "http://nonexistent.invalid", "paths": ["/nodns/"], "auth": auth},
            "hole": {"base_url": f"http://127.0.0.1:{hole.port}", "paths": ["/hole/"], "auth": auth},
        })
        with proxy(write_config(tmp / "c.yaml", cfg)) as px:
            yield sim, px
    hole.close()


def _healthy(px: Proc) -> None:
    assert httpx.get(f"{px.base}/healthz", timeout=5).status_code == 200
    r = httpx.post(px.base + CHAT, headers=bearer("alice-1"), timeout=10,
                   json={"model": "gpt-5.4", "messages": MSG})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    assert px.proc.poll() is None


def _record(px: Proc, rid: str) -> dict[str, Any]:
    rec: dict[str, Any] | None = None

    def found() -> bool:
        nonlocal rec
        rec = record_for(px.base, rid)
        return rec is not None

    wait_for(found, 5, f"the ledger record of {rid}")
    assert rec is not None
    return rec


@pytest.mark.parametrize(("prefix", "status", "code", "kind", "max_s"), [
    ("/refused", 502, "upstream_unreachable", "connect", 2.0),
    ("/nodns", 502, "upstream_unreachable", "dns", 5.0),
    ("/hole", 504, "upstream_timeout", "timeout", 2.5),    # connect_timeout_s 0.5
])
def test_unreachable_provider(faulty: tuple[Proc, Proc], prefix: str, status: int, code: str,
                              kind: str, max_s: float) -> None:
    _, px = faulty
    rid = f"unreach{prefix.replace('/', '-')}"
    before = metric(px.base, "meterproxy_upstream_errors_total", {"kind": kind})
    t0 = time.monotonic()
    r = httpx.post(f"{px.base}{prefix}{CHAT}", headers={**bearer("alice-1"), "x-request-id": rid},
                   json={"model": "gpt-5.4", "messages": MSG, "stream": True}, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "upstream_error" and err["message"]
    assert r.headers["x-request-id"] == rid
    assert took < max_s, took
    rec = _record(px, rid)
    assert metric(px.base, "meterproxy_upstream_errors_total", {"kind": kind}) == before + 1
    assert rec["status"] == status and rec["key"] == "alice-1"
    assert rec["prompt_tokens"] == rec["completion_tokens"] == 0   # nothing reached a provider
    _healthy(px)


def test_read_timeout_mid_stream(faulty: tuple[Proc, Proc]) -> None:
    """Chunks every 150 ms for 6 s against upstream_timeout_s 2: the stream is cut at ~2 s (no
    [DONE], no final chunk: the client sees a truncated stream), counted as an upstream timeout,
    and metered by estimate."""
    _, px = faulty
    before = metric(px.base, "meterproxy_upstream_errors_total", {"kind": "timeout"})
    h = {**bearer("alice-1"), "x-sim-chunk-delay-ms": "150", "x-sim-chunks": "40",
         "x-request-id": "read-timeout"}
    t0 = time.monotonic()
    with httpx.stream("POST", px.base + CHAT, headers=h, timeout=30,
                      json={"model": "gpt-5.4", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200
        raw = b""
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            for part in r.iter_raw():
                raw += part
    took = time.monotonic() - t0
    assert 1.8 < took < 4.0, took
    assert b"[DONE]" not in raw and 5 <= raw.count(b"data: {") < 40
    rec = _record(px, "read-timeout")
    assert metric(px.base, "meterproxy_upstream_errors_total", {"kind": "timeout"}) == before + 1
    assert rec["source"] == "estimated" and rec["prompt_tokens"] > 0 and rec["completion_tokens"] > 0
    _healthy(px)


@pytest.mark.parametrize("status", [500, 429])
def test_provider_error_status_and_body_pass_through(faulty: tuple[Proc, Proc], status: int) -> None:
    sim, px = faulty
    rid = f"provider-{status}"
    r = httpx.post(px.base + CHAT, headers={**bearer("alice-1"), "x-sim-status": str(status),
                                            "x-request-id": rid},
                   json={"model": "gpt-5.4", "messages": MSG})
    direct = httpx.post(sim.base + CHAT, headers={"Authorization": "Bearer x", "x-sim-status": str(status)},
                        json={"model": "gpt-5.4", "messages": MSG})
    assert r.status_code == status and r.content == direct.content   # the provider's own answer
    assert "(simulated)" in r.json()["error"]["message"]
    if status == 429:
        assert r.headers["retry-after"] == "1"       # the provider's, passed through
        assert r.headers.get("x-ratelimit-remaining-requests") != "0"   # its x-ratelimit-* replaced
    rec = _record(px, rid)
    assert rec["status"] == status and rec["completion_tokens"] == 0
    _healthy(px)


@pytest.mark.parametrize(("knobs", "check"), [
    # Garbage line + truncated JSON, no [DONE]; the usage chunk still comes (provider source).
    ({"x-sim-garbage": "1"}, "garbage"),
    # The same without usage: estimated from what the stream carried.
    ({"x-sim-garbage": "1", "x-sim-omit-usage": "1"}, "garbage-estimated"),
    # The provider breaks the connection after 4 events.
    ({"x-sim-break-after": "4"}, "broken"),
])
def test_malformed_sse(faulty: tuple[Proc, Proc], knobs: dict[str, str], check: str) -> None:
    sim, px = faulty
    h = {**bearer("alice-1"), **knobs, "x-request-id": f"sse-{check}"}
    body = {"model": "gpt-5.4", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", px.base + CHAT, headers=h, json=body, timeout=30) as r:
        assert r.status_code == 200
        raw = b""
        try:
            for part in r.iter_raw():
                raw += part
            cut = False
        except httpx.RemoteProtocolError:
            cut = True
    # A broken provider stream is cut for the client too; malformed but whole streams end normally.
    assert cut == (check == "broken")
    assert b"[DONE]" not in raw
    rec = _record(px, f"sse-{check}")
    if check.startswith("garbage"):
        with httpx.stream("POST", sim.base + CHAT, json=body, timeout=30,
                          headers={"Authorization": "Bearer x", **knobs}) as d:
            direct = b"".join(d.iter_raw())
        # Passed through byte for byte apart from ids and timestamps: same garbage, same shape.
        assert b"data: }{garbage\n\n" in raw and raw.count(b"\n\n") == direct.count(b"\n\n")
    if check == "garbage":
        assert rec["source"] == "provider" and rec["completion_tokens"] > 0
    else:
        assert rec["source"] == "estimated" and rec["prompt_tokens"] > 0 and rec["completion_tokens"] > 0
    _healthy(px)


@pytest.mark.parametrize(("knob", "content"), [("x-sim-bad-json", b"not json at all"), ("x-sim-empty", b"")])
def test_non_json_and_empty_200(faulty: tuple[Proc, Proc], knob: str, content: bytes) -> None:
    """A 200 whose JSON body is not JSON, or empty: passed through as the provider sent it,
    metered by estimate (the provider did the work but reported nothing)."""
    _, px = faulty
    rid = f"body{knob}"
    r = httpx.post(px.base + CHAT, headers={**bearer("alice-1"), knob: "1", "x-request-id": rid},
                   json={"model": "gpt-5.4", "messages": MSG})
    assert r.status_code == 200 and r.content == content
    assert r.headers["content-type"] == "application/json"
    rec = _record(px, rid)
    assert rec["status"] == 200 and rec["source"] == "estimated" and rec["prompt_tokens"] > 0
    _healthy(px)


# --- client faults ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    """Simulator + one proxy (in-process store) with the default timeouts."""
    with simulator() as sim, proxy(write_config(tmp_path_factory.mktemp("clients") / "c.yaml",
                                                make_config(sim.port))) as px:
        yield sim, px


def _raw_request(port: int, head: bytes, body: bytes = b"") -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body)
        time.sleep(0.1)


@pytest.mark.parametrize("partial", [b"", b'{"model": "gpt-5.4", "mess'])
def test_client_leaves_before_the_body(steady: tuple[Proc, Proc], partial: bytes) -> None:
    """Headers promising 1,000 bytes, then part of the body (or none), then the socket closes:
    nothing is forwarded, nothing is charged, nothing breaks."""
    sim, px = steady
    before = sim_stats(sim.base)["requests"]
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEYS["alice-1"][1].encode() +
            b"\r\nx-request-id: left-early\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(5):
        _raw_request(px.port, head, partial)
    time.sleep(0.2)
    assert sim_stats(sim.base)["requests"] == before
    assert record_for(px.base, "left-early") is None
    assert metric(px.base, "meterproxy_inflight_requests") == 0
    _healthy(px)
    assert "Traceback" not in px.output()


def test_client_leaves_mid_stream(steady: tuple[Proc, Proc]) -> None:
    """The upstream stream is cancelled within a second (typically ~0.1 s) and the request is
    metered as 499 by estimate."""
    sim, px = steady
    before = sim_stats(sim.base)["cancelled_streams"]
    h = {**bearer("bob-1"), "x-sim-chunk-delay-ms": "50", "x-sim-chunks": "400", "x-request-id": "mid-left"}
    with httpx.stream("POST", px.base + CHAT, headers=h, timeout=30,
                      json={"model": "gpt-4o-mini", "messages": MSG, "stream": True}) as r:
        it = r.iter_raw()
        for _ in range(3):
            next(it)
    took = wait_for(lambda: sim_stats(sim.base)["cancelled_streams"] > before, 2,
                    "the provider's stream to be cancelled")
    assert took < 1.0, took
    rec = _record(px, "mid-left")
    assert rec["status"] == 499 and rec["source"] == "estimated"
    assert rec["prompt_tokens"] > 0 and 0 < rec["completion_tokens"] < 400
    assert metric(px.base, "meterproxy_inflight_requests") == 0
    _healthy(px)


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaves_while_waiting_for_first_token(steady: tuple[Proc, Proc], stream: bool) -> None:
    """A first token 4 s away; the client gives up after 0.3 s. The proxy notices at once: the
    request is metered (499, prompt estimate) long before the provider would have answered."""
    _, px = steady
    rid = f"ttft-left-{stream}"
    h = {**bearer("bob-1"), "x-sim-first-token-delay-ms": "4000", "x-request-id": rid}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
            "POST", px.base + CHAT, headers=h, timeout=httpx.Timeout(30, read=0.3),
            json={"model": "gpt-4o-mini", "messages": MSG, "stream": stream}) as r:
        b"".join(r.iter_raw())
    rec = _record(px, rid)
    assert time.monotonic() - t0 < 2.5
    assert rec["status"] == 499 and rec["source"] == "estimated"
    assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] == 0
    wait_for(lambda: metric(px.base, "meterproxy_inflight_requests") == 0, 2, "inflight back to 0")
    _healthy(px)


def test_slow_reader_gets_back_pressure_not_buffering(steady: tuple[Proc, Proc]) -> None:
    """Three clients read ~49 MB streams at 1 byte per 10 ms for 3 s. Without back-pressure the
    proxy would pull the streams from the provider as fast as it sends them (~150 MB into its
    memory); with it, the provider is held back (its streams stay unfinished) and the proxy's RSS
    grows by less than 20 MB. Other requests are served meanwhile."""
    sim, px = steady
    wait_for(lambda: sim_stats(sim.base)["active_streams"] == 0, 10, "earlier streams to end")
    stats0 = sim_stats(sim.base)
    rss0 = rss_mb(px.proc.pid)
    body = (b'{"model": "gpt-5.4", "n": 2, "stream": true, "messages": [{"role": "user", "content": "x"}]}')
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEYS["carol-1"][1].encode() + b"\r\nx-sim-chunks: 100000\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    socks = []
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", px.port))
        s.sendall(head + body)
        socks.append(s)
    got = [0, 0, 0]
    for i, s in enumerate(socks):      # the provider plans a 200,000-event answer first
        s.settimeout(20)
        got[i] += len(s.recv(1))
    peak = rss0
    t0 = time.monotonic()
    k = 0
    while time.monotonic() - t0 < 3.0:
        for i, s in enumerate(socks):
            got[i] += len(s.recv(1))
        time.sleep(0.01)
        k += 1
        if k % 25 == 0:
            peak = max(peak, rss_mb(px.proc.pid))
    # Served promptly while three streams are stalled.
    t1 = time.monotonic()
    _healthy(px)
    assert time.monotonic() - t1 < 2.0
    peak = max(peak, rss_mb(px.proc.pid))
    stats = sim_stats(sim.base)
    assert stats["active_streams"] - stats0["active_streams"] == 3    # held back, not finished
    for s in socks:
        s.close()
    wait_for(lambda: sim_stats(sim.base)["active_streams"] == stats0["active_streams"], 5,
             "the stalled provider streams to be cancelled")
    assert min(got) > 100
    growth = peak - rss0
    print(f"\nslow readers: {got} bytes read in 3 s; proxy RSS {rss0:.1f} -> peak {peak:.1f} MiB")
    assert growth < 20, growth


def test_1000_idle_keepalive_connections(steady: tuple[Proc, Proc]) -> None:
    """1,000 connections that each made a request and then sit idle (keep-alive): the proxy keeps
    them all, stays responsive and grows by less than 40 MB."""
    _, px = steady
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    rss0 = rss_mb(px.proc.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", px.port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.settimeout(10)
            data = s.recv(4096)
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
        time.sleep(1.0)
        import psutil

        conns = [c for c in psutil.Process(px.proc.pid).net_connections("tcp")
                 if c.laddr and c.laddr.port == px.port and c.status == psutil.CONN_ESTABLISHED]
        assert len(conns) >= 1000, len(conns)
        t0 = time.monotonic()
        _healthy(px)
        assert time.monotonic() - t0 < 2.0
        growth = rss_mb(px.proc.pid) - rss0
        # Still alive and answering on an idle connection.
        socks[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert socks[0].recv(4096).startswith(b"HTTP/1.1 200")
        print(f"\n1,000 idle keep-alive connections: proxy RSS +{growth:.1f} MiB")
        assert growth < 40, growth
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    _healthy(px)


# --- memory --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_memory_bounded_over_10k_streams(tmp_path: Path) -> None:
    """10,000 streamed requests (concurrency 50) through one proxy process on Redis, with a share
    of broken streams, provider errors and concurrency leases: RSS after 10,000 is within 15 MiB of
    RSS after the 1,000-request warm-up; every lease is released; the backlog stays 0. Then, with
    the PostgreSQL ledger down, the backlog grows to its cap (store.max_backlog 500) and no further."""
    cap = 500
    with aof_redis("everysec") as rs, simulator() as sim, postgres() as pg:
        cfg = make_config(sim.port, store_url=rs.url, store={"max_backlog": cap},
                          ledger={"url": pg.new_database()},
                          keys={"alice-1": {"limits": {"concurrency": 1000}}},
                          users={"bob": {"limits": {"concurrency": 1000}}})
        path = write_config(tmp_path / "c.yaml", cfg)
        with proxy(path) as px:
            base = [Shape(CHAT, {"model": "gpt-5.4", "messages": MSG, "stream": True}, True,
                          {"x-sim-chunks": "2"}),
                    Shape("/v3/ai/chat_completion", {"model": "gpt-4o-mini", "messages": MSG}, True,
                          {"x-sim-chunks": "2"}),
                    Shape(CHAT, {"model": "gpt-5.4", "messages": MSG, "stream": True,
                                 "stream_options": {"include_usage": True}}, True, {"x-sim-chunks": "2"})]
            shapes = [*base * 6,
                      Shape(CHAT, {"model": "gpt-5.4", "messages": MSG, "stream": True}, True,
                            {"x-sim-break-after": "3"}),
                      Shape(CHAT, {"model": "gpt-5.4", "messages": MSG, "stream": True}, True,
                            {"x-sim-status": "500"})]

            def run(n: int, prefix: str) -> list[tuple[Shape, Result]]:
                return asyncio.run(run_load([px.base], n, 50, shapes, prefix=prefix))

            warm = run(1000, "w")
            assert all(r.status in (200, 500) for _, r in warm)
            _wait_backlog_empty(px)
            rss_warm = rss_mb(px.proc.pid)
            t0 = time.monotonic()
            results = run(9000, "m")
            elapsed = time.monotonic() - t0
            _wait_backlog_empty(px)
            rss_end = rss_mb(px.proc.pid)
            ok = [r for s, r in results if r.status == 200 and stream_complete(s, r.body)]
            assert len(ok) == 9000 * 18 // 20, len(ok)          # all but the broken and the 500s
            # Only the streams the provider broke fail on the client's side (cut, as the provider's).
            cut = [s for s, r in results if r.error]
            assert len(cut) == 9000 // 20 and all("x-sim-break-after" in s.headers for s in cut)
            r = redis.Redis.from_url(rs.url)
            leases = [k for k in r.scan_iter(match="mp:*:c") if r.zcard(k)]
            assert leases == [], leases                          # every lease released
            assert metric(px.base, "meterproxy_inflight_requests") == 0
            assert ledger_total(px.base)["requests"] == 10_000
            growth = rss_end - rss_warm
            print(f"\n10,000 streams: 9,000 in {elapsed:.1f}s; RSS {rss_warm:.1f} -> {rss_end:.1f} MiB "
                  f"(+{growth:.1f})")
            assert growth < 15, growth

            pg.stop("immediate")
            t_out = time.monotonic()
            outage = run(1500, "o")
            assert all(r.status in (200, 500) for _, r in outage)   # fail open: all served
            backlog = metric(px.base, "meterproxy_usage_backlog")
            assert backlog == cap, backlog
            assert "dropped" in px.output()
            rss_outage = rss_mb(px.proc.pid)
            t_out = time.monotonic() - t_out
            pg.start()
            _wait_backlog_empty(px)
            assert ledger_total(px.base)["requests"] == 10_000 + cap
            print(f"outage: 1,500 requests in {t_out:.1f}s; backlog capped at {backlog:.0f}; "
                  f"RSS {rss_outage:.1f} MiB")
            assert rss_outage - rss_warm < 20


def test_in_process_maps_are_capped() -> None:
    """The in-process map that grows with traffic has a hard cap: async-run ownership."""
    from meterproxy.runs import MemoryRuns

    async def go() -> None:
        runs = MemoryRuns(cap=100)
        for i in range(1000):
            await runs.remember(f"run-{i}", "alice-1", "alice", 60)
        assert len(runs) == 100
        owner = await runs.owner("run-999")
        assert owner is not None and owner[:2] == ("alice-1", "alice")
        assert await runs.owner("run-0") is None

    asyncio.run(go())
