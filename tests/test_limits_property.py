"""Random admissions, settlements and clock advances against a small exact reference model.

The reference keeps *available* tokens as Fractions (the backends keep consumption in integer
units), so it is an independent statement of the semantics. Memory runs on a fake clock and must
agree with it exactly, and its retry times must be exact. Redis runs on real time too, so the
reference is evaluated at an upper bound of the script's time (a later time only refills more):
the backend must never admit what the reference refuses.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterproxy.limits import Admission, Limits
from meterproxy.limits.memory import MemoryLimiter
from meterproxy.limits.redis import RedisLimiter, make_redis_client
from tests.limits_env import T0, FakeClock
from tests.procs import RedisServer

DAY_MS = 86_400_000
LEASE_TTL_S = 86_400.0  # leases only end by settlement here


@dataclass
class Bucket:
    cap: int
    avail: Fraction
    t: int

    def at(self, now: int) -> Fraction:
        return min(Fraction(self.cap), self.avail + Fraction((now - self.t) * self.cap, 60_000))

    def set(self, now: int, avail: Fraction) -> None:
        self.avail, self.t = avail, now


@dataclass
class Principal:
    lim: Limits
    buckets: dict[str, Bucket] = field(default_factory=dict)
    leases: set[str] = field(default_factory=set)
    day_used: dict[int, int] = field(default_factory=dict)

    def bucket(self, kind: str, now: int) -> Bucket | None:
        cap = self.lim.rpm if kind == "rpm" else self.lim.tpm
        if cap is None:
            return None
        return self.buckets.setdefault(kind, Bucket(cap, Fraction(cap), now))


class Reference:
    """What an exact implementation of the contract admits."""

    def __init__(self, key_limits: list[Limits], user_limits: Limits) -> None:
        self.keys = [Principal(k) for k in key_limits]
        self.user = Principal(user_limits)
        self.res: dict[str, tuple[int, int]] = {}  # request id -> tokens, day

    def buckets_wait(self, k: int, tokens: int, now: int) -> int:
        """Milliseconds until every bucket holds enough (0 = now)."""
        wait = 0
        for p in (self.keys[k], self.user):
            for kind, cost in (("rpm", 1), ("tpm", tokens)):
                b = p.bucket(kind, now)
                if b is not None and b.at(now) < cost:
                    short = cost - b.at(now)
                    wait = max(wait, -(-(short * 60_000) // b.cap))
        return int(wait)

    def allows(self, k: int, tokens: int, now: int) -> bool:
        ps = (self.keys[k], self.user)
        if any(p.lim.tpm is not None and tokens > p.lim.tpm for p in ps):
            return False
        day = now // DAY_MS
        if any(p.lim.daily_tokens is not None and p.day_used.get(day, 0) >= p.lim.daily_tokens
               for p in ps):
            return False
        if any(p.lim.concurrency is not None and len(p.leases) >= p.lim.concurrency for p in ps):
            return False
        return self.buckets_wait(k, tokens, now) == 0

    def charge(self, rid: str, k: int, tokens: int, now: int) -> None:
        day = now // DAY_MS
        for p in (self.keys[k], self.user):
            for kind, cost in (("rpm", 1), ("tpm", tokens)):
                b = p.bucket(kind, now)
                if b is not None:
                    b.set(now, b.at(now) - cost)
            if p.lim.concurrency is not None:
                p.leases.add(rid)
            if p.lim.daily_tokens is not None:
                p.day_used[day] = p.day_used.get(day, 0) + tokens
        self.res[rid] = (tokens, day)

    def settle(self, rid: str, k: int, tokens: int, now: int) -> None:
        for p in (self.keys[k], self.user):
            p.leases.discard(rid)
        if rid not in self.res:
            return
        reserved, day = self.res.pop(rid)
        delta = tokens - reserved
        for p in (self.keys[k], self.user):
            b = p.bucket("tpm", now)
            if b is not None and delta:
                b.set(now, min(Fraction(b.cap), b.at(now) - delta))
            if p.lim.daily_tokens is not None and day in p.day_used:
                p.day_used[day] = max(p.day_used[day] + delta, 0)


def opt(s: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    return st.one_of(st.none(), s)


limits_st = st.builds(Limits, rpm=opt(st.integers(1, 8)), tpm=opt(st.integers(50, 2000)),
                      concurrency=opt(st.integers(1, 4)), daily_tokens=opt(st.integers(0, 5000)))
op_st = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 1), st.integers(0, 2200)),
    st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 3000)),
    st.tuples(st.just("advance"), st.integers(0, 600_000), st.just(0)),
)
scenario = st.tuples(st.lists(limits_st, min_size=2, max_size=2), limits_st,
                     st.lists(op_st, max_size=40))


async def run(lim: MemoryLimiter | RedisLimiter, exact: bool, key_limits: list[Limits],
              user_limits: Limits, ops: list[tuple[str, int, int]],
              advance: Callable[[int], None], now_upper: Callable[[], int]) -> None:
    """Drive backend and reference through `ops`; `now_upper()` bounds the backend's time."""
    ref = Reference(key_limits, user_limits)
    user = uuid.uuid4().hex
    admitted: list[tuple[Admission, int]] = []
    ids = itertools.count()
    for op, a, b in ops:
        if op == "advance":
            advance(a)
            continue
        if op == "settle":
            if not admitted:
                continue
            adm, k = admitted[a % len(admitted)]
            await lim.settle(adm, b, 0)
            ref.settle(adm.request_id, k, b, now_upper())
            continue
        adm = Admission(f"r{next(ids)}", f"key{a}", user, key_limits[a], user_limits, b, 0)
        d = await lim.admit(adm)
        now = now_upper()
        allowed = ref.allows(a, b, now)
        if d.allowed:
            assert allowed, f"backend admitted what the reference refuses: {adm}"
            ref.charge(adm.request_id, a, b, now)
            admitted.append((adm, a))
        elif exact:
            assert not allowed, f"backend refused what the reference admits: {adm} {d}"
            if d.limit in ("requests", "tokens") and not d.too_large:
                wait = ref.buckets_wait(a, b, now)
                assert d.retry_after_s is not None and round(d.retry_after_s * 1000) == wait


@settings(max_examples=300, deadline=None)
@given(scenario)
def test_memory_matches_reference(case: tuple[list[Limits], Limits, list[tuple[str, int, int]]]
                                  ) -> None:
    key_limits, user_limits, ops = case
    clock = FakeClock()
    lim = MemoryLimiter(clock, lease_ttl_s=LEASE_TTL_S)
    t0_ms = round(T0 * 1000)
    virtual = [0]

    def advance(ms: int) -> None:
        virtual[0] += ms
        clock.t = (t0_ms + virtual[0]) / 1000

    asyncio.run(run(lim, True, key_limits, user_limits, ops, advance,
                    lambda: t0_ms + virtual[0]))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=scenario)
def test_redis_never_admits_more_than_reference(
        redis_server: RedisServer, case: tuple[list[Limits], Limits, list[tuple[str, int, int]]]
) -> None:
    key_limits, user_limits, ops = case

    async def main() -> None:
        lim = RedisLimiter(make_redis_client(redis_server.url), lease_ttl_s=LEASE_TTL_S)
        real0 = time.time_ns() // 1_000_000
        lim.time_offset_ms = round(T0 * 1000) - real0  # script time starts at T0

        def advance(ms: int) -> None:
            lim.time_offset_ms += ms

        def upper() -> int:  # the script's time is at most this once the call has returned
            return lim.time_offset_ms + time.time_ns() // 1_000_000 + 1

        try:
            await run(lim, False, key_limits, user_limits, ops, advance, upper)
        finally:
            await lim.close()

    asyncio.run(main())
