"""Micro-benchmark of the Redis hot path: client CPU per admission + settlement, redis-py vs WireRedis.

Run: .venv/bin/python bench/redis_client_micro.py [--loop uvloop|asyncio] [--pairs N] [--rounds R]

Starts a private redis-server (pinned to the last core when there are two or more, this process
to the first), loads the limiter's scripts through RedisLimiter, then for each client and
concurrency (1 and 16 callers) runs admit+settle pairs and divides this process's CPU time
(time.process_time: user + system, so the socket syscalls count, redis-server's work does not) by
the pairs. Rounds interleave the clients; the figures are medians over rounds, the quietest beside.
A second table times bare PINGs, the client's own cost per command without the limiter's work.

redis-py is built as make_redis_client built it before WireRedis (make_redispy_client:
BlockingConnectionPool, socket_timeout, retries off, health checks every 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from meterproxy.limits import Admission, Limits
from meterproxy.limits.redis import RedisLimiter, make_redispy_client
from meterproxy.store.wire import WireRedis

TIMEOUT_S = 0.25          # the store's default timeout_ms
KEY = Limits(rpm=10**9, tpm=10**12, concurrency=10**6, daily_tokens=10**15)
USER = Limits(rpm=10**9, monthly_usd_nano=10**18)


def start_redis() -> tuple[subprocess.Popen[bytes], int, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    tmp = tempfile.mkdtemp(prefix="mp-bench-redis-")
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", tmp]
    ncpu = os.cpu_count() or 1
    if ncpu >= 2 and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(ncpu - 1), *cmd]
        os.sched_setaffinity(0, {0})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port, tmp
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.02)


async def run_pairs(lim: RedisLimiter, concurrency: int, pairs: int, tag: str) -> float:
    """CPU µs per admit+settle pair over `pairs` pairs run by `concurrency` callers."""
    per = pairs // concurrency

    async def caller(c: int) -> None:
        for i in range(per):
            adm = Admission(f"{tag}-{c}-{i}", f"key{c % 4}", f"user{c % 8}", KEY, USER, 100, 1000)
            d = await lim.admit(adm)
            assert d.allowed, d
            await lim.settle(adm, 80, 800)

    t0 = time.process_time()
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    return (time.process_time() - t0) / (per * concurrency) * 1e6


async def run_pings(client: Any, concurrency: int, n: int) -> float:
    """CPU µs per PING over `n` PINGs sent by `concurrency` callers."""
    per = n // concurrency

    async def caller() -> None:
        for _ in range(per):
            await client.execute_command("PING")

    t0 = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return (time.process_time() - t0) / (per * concurrency) * 1e6


Results = dict[tuple[str, str, int], list[float]]   # (what, client, concurrency) -> µs per round


async def bench(url: str, pairs: int, rounds: int) -> Results:
    clients: dict[str, Callable[[], Any]] = {
        "redis-py": lambda: make_redispy_client(url, TIMEOUT_S),
        "WireRedis": lambda: WireRedis(url, TIMEOUT_S),
    }
    limiters = {name: RedisLimiter(make()) for name, make in clients.items()}
    results: Results = {}
    try:
        for name, lim in limiters.items():   # warm up: connections, script cache, caches
            for conc in (1, 16):
                await run_pairs(lim, conc, 32 * conc, f"warm-{name}-{conc}")
        for r in range(rounds):
            for conc in (1, 16):
                order = list(limiters) if r % 2 == 0 else list(reversed(limiters))
                for name in order:
                    us = await run_pairs(limiters[name], conc, pairs, f"r{r}-{name}-{conc}")
                    results.setdefault(("pair", name, conc), []).append(us)
                    us = await run_pings(limiters[name].client, conc, pairs)
                    results.setdefault(("ping", name, conc), []).append(us)
    finally:
        for lim in limiters.values():
            await lim.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="event loop (the proxy serves on uvloop)")
    ap.add_argument("--pairs", type=int, default=4000, help="pairs per client, concurrency, round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    proc, port, tmp = start_redis()
    try:
        coro: Coroutine[Any, Any, Results] = bench(
            f"redis://127.0.0.1:{port}/0", args.pairs, args.rounds)
        res = uvloop.run(coro) if args.loop == "uvloop" else asyncio.run(coro)
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Client CPU µs, {args.loop} loop, {args.pairs} per client, concurrency and round, "
          f"{args.rounds} rounds: median (quietest round)")
    for what, title in (("pair", "per admit+settle pair (2 EVALSHA)"), ("ping", "per PING")):
        print(f"\n{title}\n{'concurrency':>11}  {'redis-py':>16}  {'WireRedis':>16}  {'ratio':>13}")
        for conc in (1, 16):
            old, new = res[(what, "redis-py", conc)], res[(what, "WireRedis", conc)]
            mo, mn = statistics.median(old), statistics.median(new)
            print(f"{conc:>11}  {mo:>7.1f} ({min(old):>6.1f})  {mn:>7.1f} ({min(new):>6.1f})  "
                  f"{mo / mn:>5.2f}x ({min(old) / min(new):.2f}x)")

if __name__ == "__main__":
    main()
