"""Redis-specific ledger behaviour: outages, idempotent retries, NOSCRIPT, layout and TTLs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from meterproxy.ledger import Ledger, RedisStore, memory_store, redis_store
from meterproxy.limits import StoreError
from meterproxy.store.wire import WireRedis
from tests.procs import RedisServer
from tests.test_ledger import D0, DAY, dataset, expected, make, usage


@pytest.fixture()
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture(params=["pipeline", "wire"])
async def writer(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[WireRedis | None]:
    """How RedisStore writes: a redis-py pipeline (cluster mode), or a WireRedis batch."""
    if request.param == "pipeline":
        yield None
        return
    w = WireRedis(redis_url, 2.0)
    yield w
    await w.aclose()


@pytest.fixture()
def durable_server() -> Iterator[RedisServer]:
    """A private redis-server that keeps its data across a kill (AOF, fsync always)."""
    server = RedisServer(extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        yield server
    finally:
        server.cleanup()


async def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_outage_backlog_then_exact_totals(durable_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(durable_server.url, socket_timeout=1,
                                     socket_connect_timeout=1)
    backlog: list[int] = []
    errors: list[str] = []
    ledger = Ledger(redis_store(client), on_backlog=backlog.append, batch_size=20,
                    on_store_error=errors.append)
    await ledger.start()
    recs = dataset(300)
    for r in recs[:100]:
        ledger.submit(r)
    assert await ledger.drain(10)

    durable_server.stop()
    for r in recs[100:]:
        ledger.submit(r)
    await wait_for(lambda: len(errors) >= 3)
    assert ledger.backlog == 200 and max(backlog) == 200
    assert set(errors) == {"ledger_write"}
    assert not await ledger.drain(0.3)
    with pytest.raises(StoreError):
        await ledger.query()

    durable_server.start()   # same port; scripts are gone (NOSCRIPT path), data kept by AOF
    assert await ledger.drain(15)
    assert backlog[-1] == 0 and ledger.dropped == 0
    for gb in ([], ["user", "key", "model", "provider", "day"]):
        assert await ledger.query(group_by=gb) == expected(recs, gb)
    page = await ledger.records(None, 1000)
    assert sorted(r["request_id"] for r in page["records"]) == sorted(r.request_id for r in recs)
    await ledger.close(1)
    await client.aclose()


async def test_retried_batch_does_not_double_count(client: aioredis.Redis, writer: WireRedis | None) -> None:
    store = RedisStore(client, writer)
    batch = dataset(50)
    # A batch that timed out after committing half of it, then retried whole, then again.
    await store.write(batch[:25])
    await store.write(batch)
    await store.write(batch)
    ledger = Ledger(store)
    assert await ledger.query(group_by=["user", "day"]) == expected(batch, ["user", "day"])
    assert await client.xlen("mp:{records}") == 50


async def test_noscript_reload(client: aioredis.Redis, writer: WireRedis | None) -> None:
    store = RedisStore(client, writer)
    await store.write([make(1, D0)])
    await client.script_flush()
    await store.write([make(2, D0 + 1), make(3, D0 + 2)])
    total = (await Ledger(store).query())["total"]
    assert total == usage([make(1, D0), make(2, D0 + 1), make(3, D0 + 2)])


async def test_layout_and_ttls(client: aioredis.Redis, writer: WireRedis | None) -> None:
    store = RedisStore(client, writer)
    await store.write([make(1, D0 + 10, user="alice", key="k|1", model="a/b")])
    day_ttl = await client.ttl("mp:{u:alice}:agg:2026-11-29")
    month_ttl = await client.ttl("mp:{u:alice}:agg:2026-11")
    assert 399 * DAY < day_ttl <= 400 * DAY
    assert 4 * 365 * DAY < month_ttl <= 5 * 366 * DAY
    assert 0 < await client.ttl("mp:{u:alice}:seen:req-1") <= 3600
    assert 0 < await client.ttl("mp:{records}:seen:req-1") <= 3600
    fields = await client.hgetall("mp:{u:alice}:agg:2026-11-29")
    assert fields[b"k%7C1|openai|a/b|req"] == b"1"
    assert await client.smembers("mp:{records}:users") == {b"alice"}
    # The stream id carries the record's own time.
    entries = await client.xrange("mp:{records}")
    assert entries is not None and len(entries) == 1
    assert entries[0][0] == f"{int((D0 + 10) * 1000)}-0".encode()


async def test_read_errors_are_store_errors() -> None:
    server = RedisServer()   # never started: nothing listens on its port
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    ledger = Ledger(RedisStore(client, timeout=2.0))
    try:
        for call in (ledger.query(), ledger.records(None, 5),
                     ledger.summary("k", "u", D0)):
            with pytest.raises(StoreError):
                await call
    finally:
        await client.aclose()
        server.cleanup()


async def test_backlog_bound_drops_oldest_and_counts() -> None:
    seen: list[int] = []
    ledger = Ledger(memory_store(), on_backlog=seen.append, max_backlog=10)
    recs = [make(i, D0 + i) for i in range(15)]
    for r in recs:          # the writer is not started: everything queues
        ledger.submit(r)
    assert ledger.backlog == 10 and ledger.dropped == 5
    assert seen == list(range(1, 11))   # reported on every change, not repeated at the bound
    await ledger.start()
    assert await ledger.drain(5)
    page = await ledger.records(None, 100)
    assert [r["request_id"] for r in page["records"]] == [r.request_id for r in recs[5:]]
    assert seen[-1] == 0
    await ledger.close(1)


async def test_submit_never_raises_when_callback_fails() -> None:
    def boom(_: int) -> None:
        raise RuntimeError("metrics broke")

    ledger = Ledger(memory_store(), on_backlog=boom)
    await ledger.start()
    ledger.submit(make(1, D0))
    assert await ledger.drain(5)
    assert (await ledger.query())["total"]["requests"] == 1
    await ledger.close(1)


async def test_single_node_cluster() -> None:
    """On Redis Cluster every script's keys share one slot (else the server says CROSSSLOT)."""
    import redis

    server = RedisServer(extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
    server.start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in admin.execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER", "INFO"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        admin.close()
        client = aioredis.RedisCluster.from_url(server.url)
        ledger = Ledger(redis_store(client))
        await ledger.start()
        recs = dataset(120)
        for r in recs:
            ledger.submit(r)
        assert await ledger.drain(10)
        assert ledger.backlog == 0
        for gb in ([], ["user", "day"], ["key", "model", "provider"]):
            assert await ledger.query(group_by=gb) == expected(recs, gb)
        lo, hi = D0 + 3600, D0 + DAY + 7200
        got = await ledger.query(since=datetime.fromtimestamp(lo, UTC),
                                 until=datetime.fromtimestamp(hi, UTC))
        assert got["total"] == usage(r for r in recs if lo <= r.time < hi)
        assert len((await ledger.records(None, 1000))["records"]) == 120
        await ledger.close(1)
        await client.aclose()
    finally:
        server.cleanup()
