"""Async runs: which key created each run uid, and whether its result has been metered.

Only the creating key may poll a run (others get 404, as if it did not exist); the finished result
is metered once however often it is polled, and priced by the model the run was created with (the
poll itself is a GET with no body to name one). Memory backend for a single process, Redis (keys with
TTL) when the store is shared, so any replica can answer a poll.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from redis.asyncio import Redis, RedisCluster

from meterproxy.store import store_errors
from meterproxy.store.wire import WireRedis

_REMEMBER, _OWNER, _CLAIM = store_errors("runs_remember"), store_errors("runs_owner"), store_errors("runs_claim")


class RunRegistry(Protocol):
    async def remember(self, uid: str, key_id: str, user: str, ttl_s: float, model: str = "") -> None: ...
    async def owner(self, uid: str) -> tuple[str, str, str] | None: ...  # (key_id, user, model)
    async def claim_metering(self, uid: str, ttl_s: float) -> bool: ...


class MemoryRuns:
    """Bounded in-process registry; the oldest runs are forgotten first beyond `cap`."""

    def __init__(self, cap: int = 100_000) -> None:
        self._cap = cap
        # uid -> (key_id, user, expiry, metered, model)
        self._runs: OrderedDict[str, tuple[str, str, float, bool, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def _get(self, uid: str) -> tuple[str, str, float, bool, str] | None:
        run = self._runs.get(uid)
        if run is not None and run[2] < time.monotonic():
            del self._runs[uid]
            return None
        return run

    async def remember(self, uid: str, key_id: str, user: str, ttl_s: float, model: str = "") -> None:
        self._runs[uid] = (key_id, user, time.monotonic() + ttl_s, False, model)
        while len(self._runs) > self._cap:
            self._runs.popitem(last=False)

    async def owner(self, uid: str) -> tuple[str, str, str] | None:
        run = self._get(uid)
        return None if run is None else (run[0], run[1], run[4])

    async def claim_metering(self, uid: str, ttl_s: float) -> bool:
        run = self._get(uid)
        if run is None or run[3]:
            return False
        self._runs[uid] = (run[0], run[1], run[2], True, run[4])
        return True


class RedisRuns:
    """Run ownership in Redis: `mp:run:{uid}` → "key_id\\nuser\\nmodel", and a SET NX metering claim.
    (A value without the model line, written before the model was kept, reads as model "".)"""

    def __init__(self, client: WireRedis | Redis | RedisCluster) -> None:
        self._r = client

    async def remember(self, uid: str, key_id: str, user: str, ttl_s: float, model: str = "") -> None:
        with _REMEMBER:
            await self._r.set(f"mp:run:{{{uid}}}", f"{key_id}\n{user}\n{model}", px=int(ttl_s * 1000))

    async def owner(self, uid: str) -> tuple[str, str, str] | None:
        with _OWNER:
            raw = await self._r.get(f"mp:run:{{{uid}}}")
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        key_id, _, rest = text.partition("\n")
        user, _, model = rest.partition("\n")
        return key_id, user, model

    async def claim_metering(self, uid: str, ttl_s: float) -> bool:
        with _CLAIM:
            return bool(await self._r.set(f"mp:run:{{{uid}}}:metered", "1", nx=True,
                                          px=int(ttl_s * 1000)))


def run_path_uid(poll_prefix: str, poll_suffix: str, path: str) -> tuple[str, bool] | None:
    """For a normalised path at or under a provider's poll prefix: (the run uid it names, or "";
    whether it is exactly the poll path). None for any other path.

    Every method and every spelling lands here (`UID/`, `//UID` and `UID;x` normalise to `UID`;
    `UID%2F` is refused before), so another key's run is a 404 whatever is asked of it: a HEAD
    answered 200 and advanced the run, a DELETE or POST reached the provider (issue #14). The bare
    prefix (a list of runs, if the provider has one) names no uid: nobody may reach it."""
    if not path.startswith(poll_prefix) and path != poll_prefix.rstrip("/"):
        return None
    rest = path[len(poll_prefix):]
    uid, _, _ = rest.partition("/")
    suffix = poll_suffix.rstrip("/")
    return uid, bool(uid) and rest == uid + suffix
