"""Budgets survive restarts (in-process limiter rebuilt from the ledger) and Redis outages (usage
served with on_error: open is charged to the counters once Redis is back)."""

from __future__ import annotations

import calendar
import time
from dataclasses import replace
from pathlib import Path

from meterproxy.ledger import Ledger, UsageRecord, open_ledger_store
from meterproxy.ledger.record import day_num
from meterproxy.limits import Admission, Limits
from meterproxy.limits.catchup import OutageUsage
from meterproxy.limits.memory import MemoryLimiter
from meterproxy.limits.redis import RedisLimiter
from meterproxy.store.redis import make_redis_client
from tests.procs import RedisServer

USD = 1_000_000_000
BUDGET = Limits(monthly_usd_nano=5 * USD, daily_tokens=1000)
NONE = Limits()


def rec(i: int, t: float, tokens: int, cost: int, key: str = "k1", user: str = "alice") -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", uid=f"u{i}", time=t, key=key, user=user, provider="p",
                       model="m", status=200, source="provider", duration_ms=1, prompt_tokens=tokens,
                       cached_prompt_tokens=0, completion_tokens=0, reasoning_tokens=0, cost_nano=cost)


def adm(i: int, key: Limits = BUDGET, user: Limits = NONE) -> Admission:
    return Admission(f"a{i}", "k1", "alice", key, user, 1, 1)


async def test_memory_limiter_rebuilt_from_ledger(tmp_path: Path) -> None:
    now = calendar.timegm((2030, 1, 15, 12, 0, 0))   # the limiter's clock is injected
    led = Ledger(open_ledger_store(f"sqlite://{tmp_path}/l.db"))
    await led.open(maintain=False)
    yesterday = now - 86_400
    for r in [rec(1, now, 400, 3 * USD), rec(2, yesterday, 700, 2 * USD),
              rec(3, now, 10, USD, key="k2"),                  # the same user's other key
              rec(4, now - 40 * 86_400, 5000, 90 * USD)]:      # last month: not counted
        led.submit(r)
    assert await led.drain(5)
    rows = await led.consumption(now)
    await led.close(1)

    fresh = MemoryLimiter(lambda: now)
    assert (await fresh.admit(adm(0))).allowed        # a restarted process without the rebuild
    lim = MemoryLimiter(lambda: now)
    lim.preload(rows)
    d = await lim.admit(adm(1))                       # key k1 spent 5 USD this month
    assert not d.allowed and d.limit == "monthly_usd"
    d = await lim.admit(adm(2, key=Limits(), user=Limits(monthly_usd_nano=6 * USD)))
    assert not d.allowed and d.limit == "monthly_usd"   # the user's 6 USD: k1 + k2
    assert (await lim.admit(adm(3, key=Limits(daily_tokens=401)))).allowed   # today: 400 tokens
    assert not (await lim.admit(adm(4, key=Limits(daily_tokens=401)))).allowed


async def test_outage_usage_charged_when_redis_is_back() -> None:
    server = RedisServer(extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    lim = RedisLimiter(make_redis_client(server.url))
    outage = OutageUsage(lim)
    try:
        assert (await lim.admit(adm(0))).allowed
        server.stop()
        now = time.time()
        outage.add("k1", "alice", 300, 2 * USD, now)        # served while Redis was down
        outage.add("k1", "alice", 300, 3 * USD, now)
        assert not await outage.flush() and len(outage) == 1
        server.start()
        assert await outage.flush() and len(outage) == 0
        d = await lim.admit(adm(1))
        assert not d.allowed and d.limit == "monthly_usd"   # 5 USD charged after the outage
        st = await lim.status("k1", "alice", BUDGET, Limits())
        assert st["daily_tokens"]["remaining"] == 1000 - 1 - 600   # admission 0 reserved 1 token
    finally:
        await lim.close()
        server.cleanup()


async def test_charge_is_applied_once_per_id(redis_url: str) -> None:
    lim = RedisLimiter(make_redis_client(redis_url))
    try:
        today = day_num(time.time())
        for _ in range(3):   # a retried charge (say, after a timeout that committed)
            await lim.charge("k1", "alice", 100, USD, today, "c-1")
        await lim.charge("k1", "alice", 100, USD, today, "c-2")
        await lim.charge("k1", "alice", 100, 90 * USD, today - 40, "c-3")   # an ended window
        st = await lim.status("k1", "alice", replace(BUDGET, daily_tokens=1000), Limits())
        assert st["daily_tokens"]["remaining"] == 800
        assert st["monthly_usd"]["remaining"] in (3.0, 3 * USD)
    finally:
        await lim.close()
