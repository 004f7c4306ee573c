"""PostgreSQL ledger store on asyncpg, for several proxies on several hosts.

Why asyncpg (over psycopg 3): the proxy is asyncio end to end, and asyncpg is a native asyncio
driver speaking the binary protocol with prepared statements cached per connection; a batch of
500 records is one `INSERT ... SELECT FROM unnest(arrays)` round trip. It is maintained by
MagicStack, typed, and ships wheels for every platform we build on.

Writes take a transaction-scoped advisory lock before taking record ids from the sequence, so
ids grow in commit order across every proxy: a keyset reader (/admin/usage/records, exporters)
that saw id N never later meets a record with a smaller id. Batches are short (one statement
each for records and aggregates), so proxies queue on the lock for milliseconds.

Records are partitioned by UTC month on `time` (epoch seconds): partitions are created ahead by
`maintain` (this month and the next two) and by a write whose batch needs one; `maintain` drops
whole partitions older than `retention_days` (the daily aggregates are kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from meterproxy.ledger import sql
from meterproxy.ledger.record import COUNTERS, UsageRecord
from meterproxy.ledger.schema import (
    CURRENT_VERSION,
    LATEST,
    POSTGRES,
    RECORD_COLUMNS,
    RECORD_VERSION,
    VERSION_TABLE,
    pending,
)
from meterproxy.store import store_errors
from meterproxy.store.sql import redact

_WRITE_LOCK = 0x6D70_6C65   # "mple": pg_advisory_xact_lock key of ledger writers and migrations
_PART_RE = re.compile(r"^records_y(\d{4})m(\d{2})$")
_TYPES = ("text", "text", "float8", "text", "text", "text", "text", "text", "int4", "text", "int4",
          "int8", "int8", "int8", "int8", "int8", "int8", "int8", "text")
_INSERT = (f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) SELECT * FROM unnest("
           + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_TYPES))
           + ") ON CONFLICT DO NOTHING RETURNING uid")
_DAILY_TYPES = ("int4", "text", "text", "text", "text", "text", *("int8",) * len(COUNTERS))
_UPSERT = (f"INSERT INTO usage_daily AS d (day, key_id, user_id, team, provider, model, {', '.join(COUNTERS)}) "
           "SELECT * FROM unnest(" + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_DAILY_TYPES))
           + ") ON CONFLICT (day, key_id, user_id, team, provider, model) DO UPDATE SET "
           + ", ".join(f"{c} = d.{c} + excluded.{c}" for c in COUNTERS))


def _dollar(q: str) -> str:
    """`?` placeholders (sql.py) as $1, $2, ..."""
    parts = q.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def _month_start(y: int, m: int) -> float:
    return datetime(y, m, 1, tzinfo=UTC).timestamp()


def _next(y: int, m: int) -> tuple[int, int]:
    return (y + 1, 1) if m == 12 else (y, m + 1)


def _month_of(t: float) -> tuple[int, int]:
    d = datetime.fromtimestamp(t, UTC)
    return d.year, d.month


class PostgresStore:
    """A ledger in PostgreSQL (see the module docstring)."""

    def __init__(self, dsn: str, max_connections: int = 4, timeout_s: float = 10.0) -> None:
        self._dsn = dsn
        self.url = redact(dsn)
        self._max = max_connections
        self._timeout = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._months: set[tuple[int, int]] = set()
        self._leases: dict[str, asyncpg.Connection] = {}

    async def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            # min_size=0: creating the pool opens nothing, so a database that is down at start
            # delays records (queued) rather than failing the proxy's start.
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=self._max, command_timeout=self._timeout,
                timeout=self._timeout, max_inactive_connection_lifetime=60)
        return self._pool

    async def _fetch(self, op: str, q: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with store_errors(op):
            pool = await self._p()
            return [tuple(r) for r in await pool.fetch(q, *params)]

    # -- schema
    async def migrate(self, auto: bool = True, target: int | None = None) -> int:
        target = target or LATEST
        with store_errors("ledger_migrate"):
            async with (await self._p()).acquire() as con, con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                await con.execute(VERSION_TABLE)
                cur = int(await con.fetchval(CURRENT_VERSION))
                for v in pending(cur, target, auto):
                    for stmt in POSTGRES[v]:
                        await con.execute(stmt)
                    await con.execute(_dollar(RECORD_VERSION), v, datetime.now(UTC).isoformat())
                return max(cur, target)

    # -- writes
    async def write(self, batch: Sequence[UsageRecord]) -> int:
        recs = sql.unique(batch)
        if not recs:
            return 0
        rows = [sql.record_row(r) for r in recs]
        cols = [list(c) for c in zip(*rows, strict=True)]
        with store_errors("ledger_write"):
            async with (await self._p()).acquire() as con, con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                months = {_month_of(r.time) for r in recs} - self._months
                for ym in months:
                    await self._partition(con, *ym)
                new_ids = {r[0] for r in await con.fetch(_INSERT, *cols)}
                new = [r for r in recs if r.dedupe_id in new_ids]
                deltas = sql.daily_deltas(new)
                if deltas:
                    await con.execute(_UPSERT, *[list(c) for c in zip(*deltas, strict=True)])
        self._months |= months   # known only once committed: a rolled-back CREATE is not there
        return len(new)

    async def _partition(self, con: asyncpg.Connection, y: int, m: int) -> None:
        ny, nm = _next(y, m)
        await con.execute(
            f"CREATE TABLE IF NOT EXISTS records_y{y:04d}m{m:02d} PARTITION OF records "
            f"FOR VALUES FROM ({_month_start(y, m)!r}) TO ({_month_start(ny, nm)!r})")

    # -- reads
    async def aggregate(self, group_by: Sequence[str], filters: Mapping[str, str | None],
                        first: int | None, last: int | None) -> list[tuple[Any, ...]]:
        q, p = sql.aggregate_query(group_by, filters, first, last)
        return await self._fetch("ledger_read", _dollar(q), p)

    async def aggregate_records(self, group_by: Sequence[str], filters: Mapping[str, str | None],
                                start: float, end: float) -> list[tuple[Any, ...]]:
        q, p = sql.records_aggregate_query(group_by, filters, start, end, "floor(time / 86400)::int4")
        return await self._fetch("ledger_read", _dollar(q), p)

    async def records(self, after: int, limit: int, start: float | None = None,
                      end: float | None = None) -> list[tuple[int, UsageRecord]]:
        q, p = sql.records_query(after, limit, start, end)
        rows = await self._fetch("ledger_read", _dollar(q), p)
        return [(int(r[0]), sql.row_record(r[1:])) for r in rows]

    async def last_id(self) -> int:
        rows = await self._fetch("ledger_read", sql.LAST_ID, ())
        return int(rows[0][0])

    async def cursor(self, exporter: str) -> int:
        rows = await self._fetch("ledger_read", "SELECT seq FROM export_cursors WHERE exporter = $1",
                                 (exporter,))
        return int(rows[0][0]) if rows else 0

    async def set_cursor(self, exporter: str, record_id: int) -> None:
        await self._fetch("ledger_cursor", "INSERT INTO export_cursors VALUES ($1, $2) ON CONFLICT "
                          "(exporter) DO UPDATE SET seq = greatest(export_cursors.seq, excluded.seq)",
                          (exporter, record_id))

    async def maintain(self, now: float, retention_days: int) -> int:
        """Partitions for this month and the next two; drop those wholly past retention."""
        cutoff = now - retention_days * 86_400
        deleted = 0
        with store_errors("ledger_retention"):
            async with (await self._p()).acquire() as con, con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                ym, ahead = _month_of(now), []
                for _ in range(3):
                    await self._partition(con, *ym)
                    ahead.append(ym)
                    ym = _next(*ym)
                names = [r[0] for r in await con.fetch(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'records'")]
                for name in names:
                    m = _PART_RE.match(name)
                    if m and _month_start(*_next(int(m[1]), int(m[2]))) <= cutoff:
                        deleted += int(await con.fetchval(f"SELECT count(*) FROM {name}"))
                        await con.execute(f"DROP TABLE {name}")
                        self._months.discard((int(m[1]), int(m[2])))
        self._months.update(ahead)
        return deleted

    async def exporter_lease(self, exporter: str) -> bool:
        """True while this process holds the exporter's session advisory lock (one exporting
        process per exporter across the fleet; checked on every call, retaken after a restart)."""
        con = self._leases.pop(exporter, None)
        with store_errors("export_lease"):
            if con is not None:
                try:
                    await con.fetchval("SELECT 1")
                    self._leases[exporter] = con
                    return True
                except Exception:   # the server restarted: the lock went with the session
                    con.terminate()
            con = await asyncpg.connect(self._dsn, timeout=self._timeout)
            if await con.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", _WRITE_LOCK, exporter):
                self._leases[exporter] = con
                return True
            await con.close()
            return False

    async def ping(self) -> None:
        await self._fetch("ledger_ping", "SELECT 1", ())

    async def close(self) -> None:
        for con in self._leases.values():
            con.terminate()
        self._leases.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

