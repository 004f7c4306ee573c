"""One contract, two backends: every test runs against MemoryLimiter and RedisLimiter."""

from __future__ import annotations

import calendar
from collections.abc import AsyncIterator

import pytest

from meterproxy.limits import Limits
from tests.limits_env import Env, admit_all, approx


@pytest.fixture(params=["memory", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    e = Env(request.param, url)
    try:
        yield e
    finally:
        await e.close()


class TestLimiterContract:
    async def test_rpm_admits_exactly_capacity_then_refills(self, env: Env) -> None:
        lim, near = env.make(), approx(env.tol)
        key = Limits(rpm=5)
        ds = await admit_all(lim, [env.adm(key) for _ in range(8)])
        assert [d.allowed for d in ds] == [True] * 5 + [False] * 3
        assert ds[0].snapshot.limit_requests == 5 and ds[0].snapshot.remaining_requests == 4
        assert near(ds[0].snapshot.reset_requests_s, 12.0)
        assert ds[4].snapshot.remaining_requests == 0
        for d in ds[5:]:
            assert d.limit == "requests" and not d.too_large
            assert near(d.retry_after_s, 12.0)  # one request refills every 60/5 s
        env.advance(ds[5].retry_after_s or 0)
        assert (await lim.admit(env.adm(key))).allowed
        assert not (await lim.admit(env.adm(key))).allowed

    async def test_tpm_denies_what_does_not_fit_and_settlement_refunds(self, env: Env) -> None:
        lim, near = env.make(), approx(env.tol)
        key = Limits(tpm=600)  # 10 tokens per second
        first = env.adm(key, tokens=400)
        d1 = await lim.admit(first)
        assert d1.allowed and d1.snapshot.remaining_tokens == 200
        assert d1.snapshot.limit_tokens == 600
        d2 = await lim.admit(env.adm(key, tokens=300))
        assert not d2.allowed and d2.limit == "tokens" and not d2.too_large
        assert near(d2.retry_after_s, 10.0)  # 100 tokens short at 10 tokens/s
        await lim.settle(first, 100, 0)  # 300 tokens come back
        d3 = await lim.admit(env.adm(key, tokens=300))
        assert d3.allowed and d3.snapshot.remaining_tokens in (200, 201)

    async def test_too_large_can_never_pass(self, env: Env) -> None:
        lim = env.make()
        for key, user in ((Limits(tpm=1000), Limits()), (Limits(), Limits(tpm=1000))):
            d = await lim.admit(env.adm(key, user, tokens=1001))
            assert (d.allowed, d.limit, d.too_large) == (False, "tokens", True)
            assert d.retry_after_s is None
        assert (await lim.admit(env.adm(Limits(tpm=1000), tokens=1000))).allowed

    async def test_all_or_nothing(self, env: Env) -> None:
        lim = env.make()
        key = Limits(rpm=2, tpm=1000)
        assert (await lim.admit(env.adm(key, tokens=900))).allowed
        denied = await lim.admit(env.adm(key, tokens=500))
        assert not denied.allowed and denied.limit == "tokens"
        assert denied.snapshot.remaining_requests == 1  # the denial took no request
        assert (await lim.admit(env.adm(key, tokens=50))).allowed
        last = await lim.admit(env.adm(key, tokens=1))
        assert not last.allowed and last.limit == "requests"

    async def test_denial_reports_longest_wait(self, env: Env) -> None:
        lim, near = env.make(), approx(env.tol)
        key, user = Limits(rpm=1), Limits(tpm=60)  # key: 60 s per request; user: 1 token/s
        assert (await lim.admit(env.adm(key, user, tokens=60))).allowed
        d = await lim.admit(env.adm(key, user, tokens=30))
        assert d.limit == "requests" and near(d.retry_after_s, 60.0)
        env.advance(60)
        assert (await lim.admit(env.adm(key, user, tokens=30))).allowed

    async def test_concurrency_leases(self, env: Env) -> None:
        lim = env.make(lease_ttl_s=5)
        key = Limits(concurrency=2)
        a, b, c = env.adm(key), env.adm(key), env.adm(key)
        assert (await lim.admit(a)).allowed and (await lim.admit(b)).allowed
        dc = await lim.admit(c)
        assert not dc.allowed and dc.limit == "concurrency" and dc.retry_after_s == 1.0
        await lim.settle(a, 0, 0)
        assert (await lim.admit(c)).allowed
        assert not (await lim.admit(env.adm(key))).allowed
        env.advance(5.01)  # b and c were never settled (a killed process): their leases expire
        assert (await lim.admit(env.adm(key))).allowed

    async def test_monthly_usd_budget(self, env: Env) -> None:
        lim = env.make()
        env.set_time(calendar.timegm((2030, 1, 31, 23, 59, 0)))
        key = Limits(monthly_usd_nano=1_000_000_000)
        assert (await lim.admit(env.adm(key, cost_nano=600_000_000))).allowed
        # not yet spent (0.6 < 1): admitted, though it will overspend
        assert (await lim.admit(env.adm(key, cost_nano=600_000_000))).allowed
        d = await lim.admit(env.adm(key, cost_nano=1))
        assert (d.allowed, d.limit, d.retry_after_s) == (False, "monthly_usd", None)
        st = await lim.status("k1", "alice", key, Limits())
        assert st["monthly_usd"]["limit"] == 1.0 and st["monthly_usd"]["remaining"] == 0
        assert 59 - env.tol <= float(st["monthly_usd"]["reset_s"] or 0) <= 60
        env.advance(61)  # February: a new window
        assert (await lim.admit(env.adm(key, cost_nano=600_000_000))).allowed

    async def test_settlement_stays_in_the_window_it_was_admitted(self, env: Env) -> None:
        lim = env.make()
        env.set_time(calendar.timegm((2030, 3, 4, 23, 59, 59)))
        key = Limits(daily_tokens=1000)
        late = env.adm(key, tokens=800)
        assert (await lim.admit(late)).allowed
        env.advance(2)  # past midnight
        assert (await lim.admit(env.adm(key, tokens=900))).allowed
        await lim.settle(late, 5000, 0)  # charges yesterday, not today
        st = await lim.status("k1", "alice", key, Limits())
        assert st["daily_tokens"]["remaining"] == 100
        assert (await lim.admit(env.adm(key, tokens=1))).allowed

    async def test_daily_token_budget_settles_to_real_usage(self, env: Env) -> None:
        lim = env.make()
        key = Limits(daily_tokens=1000)
        a = env.adm(key, tokens=1000)
        assert (await lim.admit(a)).allowed
        d = await lim.admit(env.adm(key, tokens=1))
        assert (d.allowed, d.limit) == (False, "daily_tokens")
        await lim.settle(a, 300, 0)
        assert (await lim.status("k1", "alice", key, Limits()))["daily_tokens"]["remaining"] == 700
        assert (await lim.admit(env.adm(key, tokens=1))).allowed

    async def test_user_limit_binds_across_keys(self, env: Env) -> None:
        lim = env.make()
        user = Limits(rpm=3)
        ds = await admit_all(lim, [env.adm(Limits(), user, key_id=k) for k in ("a", "a", "b")])
        assert all(d.allowed for d in ds)
        assert ds[2].snapshot.limit_requests == 3 and ds[2].snapshot.remaining_requests == 0
        for k in ("a", "b"):
            d = await lim.admit(env.adm(Limits(), user, key_id=k))
            assert not d.allowed and d.limit == "requests"
        other = await lim.admit(env.adm(Limits(), user, user_id="bob"))
        assert other.allowed  # another user has its own limits

    async def test_settlement_is_idempotent(self, env: Env) -> None:
        lim = env.make()
        key = Limits(tpm=600)
        a = env.adm(key, tokens=500)
        assert (await lim.admit(a)).allowed
        await lim.settle(a, 100, 0)
        await lim.settle(a, 100, 0)
        await lim.settle(a, 0, 0)
        st = await lim.status("k1", "alice", key, Limits())
        assert st["tokens"]["remaining"] in (500, 501)

    async def test_settlement_after_reservation_expired_changes_nothing(self, env: Env) -> None:
        lim = env.make(reservation_ttl_s=0.05)
        key = Limits(tpm=600, concurrency=1)
        a = env.adm(key, tokens=500)
        assert (await lim.admit(a)).allowed
        await env.real_wait(0.15)
        await lim.settle(a, 0, 0)  # no refund: the record is gone
        st = await lim.status("k1", "alice", key, Limits())
        assert 100 <= int(st["tokens"]["remaining"] or 0) <= 105
        assert (await lim.admit(env.adm(key, tokens=1))).allowed  # but the lease was released

    async def test_debt_is_carried_and_repaid(self, env: Env) -> None:
        lim, near = env.make(), approx(env.tol)
        key = Limits(tpm=600)  # 10 tokens per second
        a = env.adm(key, tokens=100)
        assert (await lim.admit(a)).allowed
        await lim.settle(a, 700, 0)  # 100 tokens over capacity
        d = await lim.admit(env.adm(key, tokens=10))
        assert not d.allowed and d.limit == "tokens" and near(d.retry_after_s, 11.0)
        assert d.snapshot.remaining_tokens == 0
        assert d.snapshot.reset_tokens_s is not None and d.snapshot.reset_tokens_s > 60
        env.advance(11)
        assert (await lim.admit(env.adm(key, tokens=10))).allowed

    async def test_refund_never_exceeds_capacity(self, env: Env) -> None:
        lim = env.make()
        key = Limits(tpm=600)
        a = env.adm(key, tokens=100)
        assert (await lim.admit(a)).allowed
        env.advance(60)  # refilled completely meanwhile
        await lim.settle(a, 0, 0)
        assert not (await lim.admit(env.adm(key, tokens=601))).allowed
        assert (await lim.admit(env.adm(key, tokens=600))).allowed
        assert not (await lim.admit(env.adm(key, tokens=10))).allowed

    async def test_lowered_limit_keeps_consumption(self, env: Env) -> None:
        lim, near = env.make(), approx(env.tol)
        assert all(d.allowed for d in await admit_all(
            lim, [env.adm(Limits(rpm=10)) for _ in range(6)]))
        d = await lim.admit(env.adm(Limits(rpm=5)))
        assert not d.allowed and d.limit == "requests" and d.snapshot.remaining_requests == 0
        assert near(d.retry_after_s, 24.0)  # 2 requests over at 5 per minute
        d = await lim.admit(env.adm(Limits(rpm=10)))
        assert d.allowed and d.snapshot.remaining_requests == 3

    async def test_status_reports_the_keys_limits(self, env: Env) -> None:
        lim = env.make()
        key = Limits(rpm=10, tpm=1000, concurrency=3, daily_tokens=5000,
                     monthly_usd_nano=2_000_000_000)
        assert (await lim.admit(env.adm(key, Limits(rpm=100), tokens=100,
                                        cost_nano=100_000_000))).allowed
        st = await lim.status("k1", "alice", key, Limits(rpm=100))
        assert set(st) == {"requests", "tokens", "concurrency", "daily_tokens", "monthly_usd"}
        assert st["requests"]["limit"] == 10 and st["requests"]["remaining"] == 9
        assert st["tokens"]["remaining"] == 900 and st["concurrency"]["remaining"] == 2
        assert st["daily_tokens"] == {"limit": 5000, "remaining": 4900,
                                      "reset_s": st["daily_tokens"]["reset_s"]}
        assert 12 * 3600 - 1 - env.tol <= float(st["daily_tokens"]["reset_s"] or 0) <= 12 * 3600
        assert st["monthly_usd"]["limit"] == 2.0
        assert abs(float(st["monthly_usd"]["remaining"] or 0) - 1.9) < 1e-9
        assert near_reset(float(st["requests"]["reset_s"] or 0), 6.0, env.tol)

    async def test_snapshot_falls_back_to_user_buckets(self, env: Env) -> None:
        lim = env.make()
        d = await lim.admit(env.adm(Limits(rpm=7), Limits(rpm=100, tpm=1000), tokens=10))
        s = d.snapshot
        assert (s.limit_requests, s.remaining_requests) == (7, 6)
        assert (s.limit_tokens, s.remaining_tokens) == (1000, 990)
        d = await lim.admit(env.adm(Limits(), Limits()))
        assert d.allowed and d.snapshot.limit_requests is None and d.snapshot.limit_tokens is None


def near_reset(got: float, want: float, tol: float) -> bool:
    return want - tol - 0.002 <= got <= want + 0.002
