"""Redis limiter: any number of proxy processes share limits through one Redis (or Redis Cluster).

The client is `make_redis_client`'s: WireRedis (wire.py, one pipelined connection, a fraction
of redis-py's CPU per command) on a single node, redis-py's RedisCluster on a cluster.

Each call is one round trip: `EVALSHA` of a package Lua script (admit.lua, settle.lua,
status.lua, each prefixed with common.lua). A NOSCRIPT answer (after `SCRIPT FLUSH`, a restart,
a failover, a new cluster node) is the only error retried, with `EVAL` of the full script, which
loads and runs it in the same round trip. Nothing else is ever retried: a timed-out admission may
have committed, and replaying it would charge twice.

Semantics (shared with `memory.MemoryLimiter`, proved by tests/test_limits_contract.py):

- `rpm`/`tpm` are token buckets of capacity = the per-minute figure, refilled continuously at
  capacity/60 per second. They store *consumption* and a timestamp, so a lowered capacity applies
  at once and keeps what was consumed. A bucket key expires once refilled (missing = full).
- `concurrency` is a sorted set of leases (request_id -> deadline, `lease_ttl_s` ahead). Expired
  leases are purged at each admission, so a process killed mid-request frees its slot when the
  lease expires. Settlement removes the lease.
- Budgets count tokens and nano-USD per UTC day (`YYYY-MM-DD`) and month (`YYYY-MM`), by the
  script's clock (Redis `TIME`, never the proxies'). A budget denies once `used >= limit`
  (spent); an admission adds its reservation to `used`. Budget denials carry no retry time.
- Too large (`tokens` above a tpm capacity) is denied first; then a spent budget; otherwise the
  bucket or lease with the longest wait (`retry_after_s` = when this exact request would pass;
  a full concurrency slot reports 1 s, since leases free when requests end).
- Settlement is idempotent through a reservation record (tokens, cost, windows) with a TTL.

Key layout, one hash tag per user so every key of one call lives in one cluster slot:
`mp:{u:<user>}:k:<key_id>:rpm|tpm|c|d|m`, `mp:{u:<user>}:u:rpm|...`, `mp:{u:<user>}:r:<id>`.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from meterproxy.limits import LIMIT_NAMES, Admission, Decision, Limits, RateSnapshot
from meterproxy.limits._view import status_view
from meterproxy.limits.memory import calendar_of
from meterproxy.store import store_errors
from meterproxy.store.redis import make_redis_client, make_redispy_client
from meterproxy.store.wire import WireRedis

__all__ = ["RedisClient", "RedisLimiter", "make_redis_client", "make_redispy_client"]

# What the limiter runs on: WireRedis on a single node (make_redis_client), RedisCluster on a
# cluster; a redis-py Redis works too (slower: it is what the benchmark compares against).
RedisClient = WireRedis | Redis | RedisCluster
# limit names as the script returns them (bytes, or str with decode_responses)
_NAMES: dict[bytes | str, str] = {
    **{n: n for n in LIMIT_NAMES}, **{n.encode(): n for n in LIMIT_NAMES}}


def _script(name: str) -> str:
    files = resources.files("meterproxy.limits")
    return files.joinpath("common.lua").read_text() + "\n" + files.joinpath(name).read_text()


@functools.lru_cache(maxsize=4096)
def _limit_args(lim: Limits) -> tuple[int | str, ...]:
    """The seven limits as script arguments ("" = unlimited), cached: Limits objects are reused."""
    return tuple("" if v is None else v for v in (
        lim.rpm, lim.tpm, lim.concurrency, lim.daily_tokens, lim.monthly_tokens,
        lim.daily_usd_nano, lim.monthly_usd_nano))


@functools.lru_cache(maxsize=16384)
def _key_names(user: str, key_id: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(admit keys without the reservation, settle keys without it, reservation prefix)."""
    k, u = f"mp:{{u:{user}}}:k:{key_id}:", f"mp:{{u:{user}}}:u:"
    admit = tuple(p + s for p in (k, u) for s in ("rpm", "tpm", "c", "d", "m"))
    settle = tuple(p + s for p in (k, u) for s in ("tpm", "c", "d", "m"))
    return admit, settle, f"mp:{{u:{user}}}:r:"


def _opt(v: int) -> int | None:
    return None if v < 0 else v


class RedisLimiter:
    """`Limiter` on Redis or Redis Cluster. The client should come from `make_redis_client`
    (WireRedis on a single node, RedisCluster on a cluster).

    `time_offset_ms` shifts the scripts' clock; only tests set it (to run refill and calendar
    windows without sleeping).
    """

    def __init__(self, client: RedisClient, *, lease_ttl_s: float = 900.0,
                 reservation_ttl_s: float = 3600.0, time_offset_ms: int = 0) -> None:
        self.client = client
        self.time_offset_ms = time_offset_ms
        self._lease_ms = int(lease_ttl_s * 1000)
        self._res_ms = int(reservation_ttl_s * 1000)
        self._src = {n: _script(f"{n}.lua") for n in ("admit", "settle", "status", "charge")}
        self._sha = {n: _sha1(s) for n, s in self._src.items()}
        self._errors = {n: store_errors(n) for n in self._src}

    async def _run(self, name: str, numkeys: int, args: list[Any]) -> Any:
        with self._errors[name]:
            try:
                return await self.client.execute_command(
                    "EVALSHA", self._sha[name], numkeys, *args)
            except NoScriptError:
                # the script cache was emptied: EVAL loads and runs it in one round trip
                return await self.client.execute_command("EVAL", self._src[name], numkeys, *args)

    async def admit(self, adm: Admission) -> Decision:
        """Check every limit of key and user in one script; charge only if all pass."""
        keys, _, res = _key_names(adm.user, adm.key_id)
        r = await self._run("admit", 11, [
            *keys, res + adm.request_id, adm.request_id, adm.tokens, adm.cost_nano,
            *_limit_args(adm.key_limits), *_limit_args(adm.user_limits),
            self._lease_ms, self._res_ms, self.time_offset_ms])
        snap = RateSnapshot(_opt(r[4]), _opt(r[5]), max(r[6], 0) / 1000,
                            _opt(r[7]), _opt(r[8]), max(r[9], 0) / 1000)
        if r[0] == 1:
            return Decision(True, snapshot=snap)
        return Decision(False, _NAMES[r[1]], None if r[2] < 0 else r[2] / 1000, r[3] == 1, snap)

    async def settle(self, adm: Admission, tokens: int, cost_nano: int) -> None:
        """Apply real minus reserved usage where the admission charged it; release the leases."""
        _, keys, res = _key_names(adm.user, adm.key_id)
        kt, ut = adm.key_limits.tpm, adm.user_limits.tpm
        await self._run("settle", 9, [
            *keys, res + adm.request_id, adm.request_id, tokens, cost_nano,
            "" if kt is None else kt, "" if ut is None else ut, self.time_offset_ms])

    async def status(self, key_id: str, user: str, key_limits: Limits,
                     user_limits: Limits) -> dict[str, dict[str, float | int | None]]:
        """The key's configured limits with what remains and when each resets (GET /usage)."""
        keys = _key_names(user, key_id)[0][:5]
        lim = key_limits
        r = await self._run("status", 5, [
            *keys, "" if lim.rpm is None else lim.rpm, "" if lim.tpm is None else lim.tpm,
            self.time_offset_ms])
        return status_view(lim, r)

    async def charge(self, key_id: str, user: str, tokens: int, cost_nano: int, day: int,
                     charge_id: str) -> None:
        """Add usage of epoch day `day` to the key's and user's budget counters, once per
        `charge_id` (usage served while Redis was down; see catchup.py)."""
        keys = _key_names(user, key_id)[0]
        day_id, mon_id, day_end, mon_end = calendar_of(day)
        await self._run("charge", 5, [
            keys[3], keys[4], keys[8], keys[9], f"mp:{{u:{user}}}:x:{charge_id}",
            tokens, cost_nano, day_id, mon_id, day_end, mon_end, 40 * 86_400_000,
            self.time_offset_ms])

    async def close(self) -> None:
        """Close the client (its connection, or its connection pool)."""
        await self.client.aclose()


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()
