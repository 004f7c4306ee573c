"""Redis-only behaviour: many processes on one store, lost script caches, outages, Cluster."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from meterproxy.limits import Admission, Limits, StoreError
from meterproxy.limits.redis import RedisLimiter, make_redis_client, make_redispy_client
from tests.procs import RedisServer, free_port


def adm(i: int, key: Limits, user: str = "alice", key_id: str = "k1", tokens: int = 0) -> Admission:
    return Admission(f"r{i}", key_id, user, key, Limits(), tokens, 0)


@pytest.fixture()
async def limiter(redis_url: str) -> AsyncIterator[RedisLimiter]:
    lim = RedisLimiter(make_redis_client(redis_url))
    try:
        yield lim
    finally:
        await lim.close()


async def test_two_instances_share_limits_exactly(redis_url: str) -> None:
    a, b = RedisLimiter(make_redis_client(redis_url)), RedisLimiter(make_redis_client(redis_url))
    try:
        key = Limits(rpm=10)
        ds = await asyncio.gather(*((a if i % 2 else b).admit(adm(i, key)) for i in range(40)))
        assert sum(d.allowed for d in ds) == 10
        assert {d.limit for d in ds if not d.allowed} == {"requests"}
    finally:
        await a.close()
        await b.close()


async def test_noscript_reloads_transparently(limiter: RedisLimiter, redis_url: str) -> None:
    key = Limits(rpm=3, concurrency=5)
    first = adm(0, key)
    assert (await limiter.admit(first)).allowed
    sync = redis.Redis.from_url(redis_url)
    try:
        sync.script_flush()
        assert sync.script_exists(limiter._sha["admit"]) == [False]
        assert (await limiter.admit(adm(1, key))).allowed
        await limiter.settle(first, 0, 0)
        st = await limiter.status("k1", "alice", key, Limits())
        assert st["requests"]["remaining"] == 1 and st["concurrency"]["remaining"] == 4
        assert sync.script_exists(limiter._sha["admit"], limiter._sha["settle"]) == [True, True]
    finally:
        sync.close()


async def test_script_flush_mid_traffic_loses_nothing(
        limiter: RedisLimiter, redis_url: str) -> None:
    flusher = make_redispy_client(redis_url)
    stop = asyncio.Event()

    async def flush_repeatedly() -> int:
        n = 0
        while not stop.is_set():
            await flusher.script_flush()
            n += 1
            await asyncio.sleep(0)
        return n

    task = asyncio.create_task(flush_repeatedly())
    try:
        key = Limits(rpm=150)
        ds = []
        for batch in range(10):
            ds += await asyncio.gather(
                *(limiter.admit(adm(batch * 20 + i, key)) for i in range(20)))
    finally:
        stop.set()
        flushes = await task
        await flusher.aclose()
    assert flushes > 1
    assert sum(d.allowed for d in ds) == 150  # every call answered, none charged twice


async def test_script_errors_become_store_errors(limiter: RedisLimiter, redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    try:
        sync.hset("mp:{u:alice}:k:k1:rpm", "x", "1")  # wrong type under a bucket key
    finally:
        sync.close()
    with pytest.raises(StoreError) as err:
        await limiter.admit(adm(0, Limits(rpm=5)))
    assert err.value.operation == "admit"
    assert isinstance(err.value.__cause__, redis.exceptions.ResponseError)


async def test_closed_transport_is_a_store_error(limiter: RedisLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop raises RuntimeError when redis-py writes to a transport closed under it, which a Redis
    restart can do mid-connect. It escaped as RuntimeError: admission answered 500 and settlement
    skipped the ledger record (seen in CI under SIGKILLed Redis). It must be a StoreError."""
    async def closed(*_: object, **__: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    monkeypatch.setattr(limiter.client, "execute_command", closed)
    for name, op in (("admit", limiter.admit(adm(0, Limits(rpm=5)))),
                     ("settle", limiter.settle(adm(0, Limits(rpm=5)), 0, 0))):
        with pytest.raises(StoreError) as err:
            await op
        assert err.value.operation == name
        assert isinstance(err.value.__cause__, RuntimeError)


async def test_store_down_fails_fast_and_recovers_on_restart() -> None:
    server = RedisServer().start()
    lim = RedisLimiter(make_redis_client(server.url))
    try:
        key = Limits(rpm=5)
        assert (await lim.admit(adm(0, key))).allowed
        server.stop()
        for op in (lim.admit(adm(1, key)), lim.settle(adm(0, key), 0, 0),
                   lim.status("k1", "alice", key, Limits())):
            t0 = time.monotonic()
            with pytest.raises(StoreError):
                await op
            assert time.monotonic() - t0 < 1.0
        server.start()  # same port, empty data, empty script cache
        d = await lim.admit(adm(2, key))
        assert d.allowed and d.snapshot.remaining_requests == 4
    finally:
        await lim.close()
        server.cleanup()


async def test_hung_store_times_out_without_retry() -> None:
    server = RedisServer().start()
    lim = RedisLimiter(make_redis_client(server.url, timeout_s=0.2))
    assert server.proc is not None
    try:
        assert (await lim.admit(adm(0, Limits(rpm=5)))).allowed
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError) as err:
                await lim.admit(adm(1, Limits(rpm=5)))
            # one attempt only: a retry could replay an admission that committed
            assert time.monotonic() - t0 < 0.6
            assert isinstance(err.value.__cause__, redis.exceptions.TimeoutError)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        d = await lim.admit(adm(2, Limits(rpm=5)))
        assert d.allowed
    finally:
        await lim.close()
        server.cleanup()


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    nodes = [RedisServer(extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                "--cluster-port", str(free_port())]) for _ in range(3)]
    try:
        for n in nodes:
            n.start()
        cli = shutil.which("redis-cli")
        assert cli is not None
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        for n in nodes:
            c = redis.Redis(port=n.port)
            while c.cluster("INFO").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, "cluster never became ok"
                time.sleep(0.05)
            c.close()
        yield nodes
    finally:
        for n in nodes:
            n.cleanup()


async def test_cluster_admission_and_settlement(cluster: list[RedisServer]) -> None:
    lim = RedisLimiter(make_redis_client(f"redis+cluster://127.0.0.1:{cluster[0].port}"))
    try:
        key, user = Limits(rpm=3, tpm=1000, concurrency=2, daily_tokens=10_000), Limits(rpm=100)
        users = [f"user{i}" for i in range(12)]  # spread over many slots and all three nodes
        for n, u in enumerate(users):
            ds = [await lim.admit(Admission(f"{u}-{i}", "laptop", u, key, user, 100, 1000))
                  for i in range(3)]
            assert [d.allowed for d in ds] == [True, True, False]
            assert ds[2].limit == "concurrency"
            await lim.settle(Admission(f"{u}-0", "laptop", u, key, user, 100, 1000), 40, 500)
            st = await lim.status("laptop", u, key, user)
            assert st["tokens"]["remaining"] == 860 and st["daily_tokens"]["remaining"] == 9860
            d = await lim.admit(Admission(f"{u}-3", "laptop", u, key, user, 100, 1000))
            assert d.allowed, n
        # every key of one user hashes to one slot
        slots = set()
        for node in cluster:
            c = redis.Redis(port=node.port)
            for k in c.scan_iter("mp:{u:user0}:*"):
                slots.add(c.cluster("KEYSLOT", k))
            c.close()
        assert len(slots) == 1
        owners = set()
        for u in users:
            owners.add(lim.client.get_node_from_key(f"mp:{{u:{u}}}:u:rpm").name)  # type: ignore[union-attr]
        assert len(owners) == 3
    finally:
        await lim.close()


async def test_cluster_noscript_reload(cluster: list[RedisServer]) -> None:
    lim = RedisLimiter(make_redis_client(f"redis+cluster://127.0.0.1:{cluster[0].port}"))
    try:
        key = Limits(rpm=2)
        assert (await lim.admit(adm(0, key, user="flushy"))).allowed
        for node in cluster:
            c = redis.Redis(port=node.port)
            c.script_flush()
            c.close()
        assert (await lim.admit(adm(1, key, user="flushy"))).allowed
        d = await lim.admit(adm(2, key, user="flushy"))
        assert not d.allowed and d.limit == "requests"
    finally:
        await lim.close()


async def test_programming_error_is_not_a_store_outage(limiter: RedisLimiter,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the uvloop "handler is closed" RuntimeError is an outage; any other RuntimeError is a
    bug and must surface as itself (a StoreError would hide it behind on_error: open)."""
    async def bug(*_: object, **__: object) -> None:
        raise RuntimeError("dictionary changed size during iteration")

    monkeypatch.setattr(limiter.client, "execute_command", bug)
    with pytest.raises(RuntimeError, match="dictionary changed") as err:
        await limiter.admit(adm(0, Limits(rpm=5)))
    assert not isinstance(err.value, StoreError)
