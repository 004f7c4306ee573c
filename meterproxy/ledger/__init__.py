"""The usage ledger: every metered request as a record, plus per-day and per-month aggregates.

    ledger = Ledger(redis_store(client), on_backlog=gauge.set)   # or memory_store()
    await ledger.start()
    ledger.submit(record)                     # after the response; O(1), never raises
    await ledger.summary(key, user, now)      # GET /usage
    await ledger.query(group_by=["day"], ...) # GET /admin/usage
    await ledger.records(since_id, limit)     # GET /admin/usage/records
    await ledger.close()                      # graceful shutdown: drain, then stop

Writes go through a background writer (writer.py); reads go to the store and may raise
`meterproxy.limits.StoreError` (→ 503). Usage objects follow SPEC.md and add `cost_nano`, the
exact integer cost in nano-USD, next to the float `cost_usd`, so finance can sum exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any

from redis.asyncio import Redis, RedisCluster

from meterproxy.ledger.memory import MemoryStore
from meterproxy.ledger.query import GROUP_FIELDS, run_query, summary
from meterproxy.ledger.record import LedgerStore, Totals, UsageJSON, UsageRecord, record_json
from meterproxy.ledger.redis import RedisStore
from meterproxy.ledger.writer import Writer
from meterproxy.limits.redis import make_redispy_client
from meterproxy.store.wire import WireRedis

__all__ = [
    "GROUP_FIELDS", "MAX_RECORDS_PAGE", "Ledger", "LedgerStore", "MemoryStore", "RedisStore",
    "Totals", "UsageJSON", "UsageRecord", "memory_store", "redis_store",
]

MAX_RECORDS_PAGE = 10_000


def memory_store() -> LedgerStore:
    """An in-process store (single process only; gone when the process exits)."""
    return MemoryStore()


def redis_store(client: Redis | RedisCluster | WireRedis,
                writer: WireRedis | None = None) -> LedgerStore:
    """A store on Redis (a node or a cluster) through clients the caller owns: `client` from
    `make_redis_client` (on a single node a WireRedis: writes through it, reads through a
    redis-py client the store opens and closes), or a redis-py client for reads plus an optional
    WireRedis `writer` (see RedisStore)."""
    if isinstance(client, WireRedis):
        # Writes on the WireRedis; reads on a redis-py client opened here, closed with the store.
        # Reads are idempotent: one retry, so the first read after a Redis restart does not fail
        # on a pooled connection the restart closed.
        reader = make_redispy_client(client.url, client.timeout_s, retries=1)
        return RedisStore(reader, client, close_reader=True)
    return RedisStore(client, writer)


class Ledger:
    """Usage records in, usage reports out. See the module docstring."""

    def __init__(self, store: LedgerStore, on_backlog: Callable[[int], None] | None = None,
                 max_backlog: int = 1_000_000, batch_size: int = 500,
                 on_store_error: Callable[[str], None] | None = None) -> None:
        self.store = store
        self._writer = Writer(store, on_backlog=on_backlog, max_backlog=max_backlog,
                              batch_size=batch_size, on_store_error=on_store_error)

    def submit(self, rec: UsageRecord) -> None:
        """Queue a record for the background writer: O(1), never blocks, never raises."""
        self._writer.submit(rec)

    async def start(self) -> None:
        """Start the background writer."""
        await self._writer.start()

    async def drain(self, timeout: float) -> bool:
        """Wait until the backlog is empty; True if it emptied within `timeout` seconds."""
        return await self._writer.drain(timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Drain (up to `timeout`), then stop the writer. Does not close the store's client."""
        await self._writer.close(timeout)
        await self.store.close()

    @property
    def backlog(self) -> int:
        """Records waiting for the store."""
        return self._writer.backlog

    @property
    def dropped(self) -> int:
        """Records dropped because the backlog exceeded `max_backlog` (oldest first)."""
        return self._writer.dropped

    async def summary(self, key: str, user: str, now: float) -> dict[str, UsageJSON]:
        """GET /usage: {"day", "month", "user_day", "user_month"} usage objects (UTC windows)."""
        return await summary(self.store, key, user, now)

    async def query(self, *, user: str | None = None, key: str | None = None,
                    model: str | None = None, provider: str | None = None,
                    since: date | datetime | None = None, until: date | datetime | None = None,
                    group_by: Sequence[str] = ()) -> dict[str, Any]:
        """GET /admin/usage: {"group_by", "rows", "total"}; rows sorted by their group fields.

        `since` is inclusive, `until` exclusive; a plain `date` means its whole UTC day (so
        until=date(2026, 11, 30) includes the 30th); naive datetimes are UTC. Raises
        ValueError for a group_by field outside GROUP_FIELDS.
        """
        return await run_query(self.store, user=user, key=key, model=model, provider=provider,
                               since=since, until=until, group_by=group_by)

    async def records(self, since_id: str | None, limit: int) -> dict[str, Any]:
        """GET /admin/usage/records: up to `limit` (1..10,000) records after `since_id`, oldest
        first, and the id to pass next. Raises ValueError for a malformed since_id."""
        limit = max(1, min(limit, MAX_RECORDS_PAGE))
        page = await self.store.records(since_id or None, limit)
        nxt = page[-1][0] if page else (since_id or "0-0")
        return {"records": [record_json(i, r) for i, r in page], "next_since_id": nxt}
