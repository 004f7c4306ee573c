"""A limiter backend plus a controllable clock, so one test body runs against memory and Redis.

Memory uses a fake clock. Redis uses the scripts' time offset (Redis `TIME` + offset), so virtual
time moves without sleeping; real time still passes in between, hence `tol` for Redis asserts.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import Callable
from typing import Any

from meterproxy.limits import Admission, Decision, Limits
from meterproxy.limits.memory import MemoryLimiter
from meterproxy.limits.redis import RedisLimiter, make_redis_client

NONE = Limits()  # no limits at all
T0 = calendar.timegm((2030, 1, 15, 12, 0, 0))


class FakeClock:
    """Epoch seconds that move only when told."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Env:
    """One backend under test with its clock controls."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.clock = FakeClock()
        self.tol = 0.0 if kind == "memory" else 0.25  # seconds of real time Redis may see
        self.limiters: list[Any] = []
        self._n = 0

    def make(self, **opts: Any) -> MemoryLimiter | RedisLimiter:
        """A limiter of this backend; Redis ones share this Env's virtual time."""
        if self.kind == "memory":
            lim: MemoryLimiter | RedisLimiter = MemoryLimiter(self.clock, **opts)
        else:
            assert self.redis_url is not None
            lim = RedisLimiter(make_redis_client(self.redis_url), **opts)
            lim.time_offset_ms = self._offset()
        self.limiters.append(lim)
        return lim

    def _offset(self) -> int:
        return round(self.clock.t * 1000) - round(time.time() * 1000)

    def _sync(self) -> None:
        for lim in self.limiters:
            if isinstance(lim, RedisLimiter):
                lim.time_offset_ms = self._offset()

    def set_time(self, t: float) -> None:
        """Jump virtual time to epoch seconds `t`."""
        self.clock.t = t
        self._sync()

    def advance(self, s: float) -> None:
        """Move virtual time forward by `s` seconds (Redis: the offset; no sleep)."""
        if self.kind == "memory":
            self.clock.t += s
        else:
            for lim in self.limiters:
                lim.time_offset_ms += round(s * 1000)

    async def real_wait(self, s: float) -> None:
        """Let Redis key TTLs (PX, real time) run out; memory just advances its clock."""
        if self.kind == "memory":
            self.clock.t += s
        else:
            await asyncio.sleep(s)

    def adm(self, key: Limits = NONE, user: Limits = NONE, tokens: int = 0,
            cost_nano: int = 0, key_id: str = "k1", user_id: str = "alice") -> Admission:
        """A fresh admission with a unique request id."""
        self._n += 1
        return Admission(f"req-{self._n}", key_id, user_id, key, user, tokens, cost_nano)

    async def close(self) -> None:
        for lim in self.limiters:
            await lim.close()


async def admit_all(lim: Any, adms: list[Admission]) -> list[Decision]:
    """Admit one after the other, back to back."""
    return [await lim.admit(a) for a in adms]


def approx(tol: float) -> Callable[[float | None, float], bool]:
    """Compare a seconds figure within the backend's tolerance."""
    def near(got: float | None, want: float) -> bool:
        return got is not None and want - 0.002 - tol <= got <= want + 0.002
    return near
