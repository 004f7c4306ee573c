"""The usage ledger: every metered request as a record, plus daily aggregates, in SQL.

    ledger = Ledger(open_store(url), on_backlog=gauge.set)   # sqlite:///… or postgresql://…
    await ledger.open(auto_migrate=True)      # schema check/migration, then the writer starts
    ledger.submit(record)                     # after the response; O(1), never raises
    await ledger.summary(key, user, now)      # GET /usage
    await ledger.query(group_by=["day"], ...) # GET /admin/usage
    await ledger.records(since_id, limit)     # GET /admin/usage/records
    await ledger.close()                      # graceful shutdown: drain, then stop

Writes go through a background writer (writer.py); reads go to the store and may raise
`meterproxy.store.StoreError` (→ 503). Usage objects (docs/api.md) carry `cost_nano`, the
exact integer cost in nano-USD, next to the float `cost_usd`, so finance can sum exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any

from meterproxy.ledger.backends import open_ledger_store
from meterproxy.ledger.query import GROUP_FIELDS, consumption, run_query, summary
from meterproxy.ledger.record import Totals, UsageJSON, UsageRecord, parse_record_id, record_json
from meterproxy.ledger.schema import LATEST, SchemaTooNew, SchemaTooOld
from meterproxy.ledger.store import LedgerStore
from meterproxy.ledger.writer import Writer

__all__ = [
    "GROUP_FIELDS", "LATEST", "MAX_RECORDS_PAGE", "Ledger", "LedgerStore", "SchemaTooNew",
    "SchemaTooOld", "Totals", "UsageJSON", "UsageRecord", "open_ledger_store",
]

log = logging.getLogger("meterproxy.ledger")
MAX_RECORDS_PAGE = 10_000
# Reads wait this long at most for this process's queued records (the writer gathers up to 200 ms
# of them per transaction); with the database down they answer from what is committed.
READ_FLUSH_S = 1.0
MAINTAIN_EVERY_S = 3600.0


class Ledger:
    """Usage records in, usage reports out. See the module docstring."""

    def __init__(self, store: LedgerStore, on_backlog: Callable[[int], None] | None = None,
                 max_backlog: int = 1_000_000, batch_size: int = 500,
                 on_store_error: Callable[[str], None] | None = None,
                 on_write: Callable[[str], None] | None = None,
                 retention_days: int = 400) -> None:
        self.store = store
        self.retention_days = retention_days
        self._writer = Writer(store, on_backlog=on_backlog, max_backlog=max_backlog,
                              batch_size=batch_size, on_store_error=on_store_error,
                              on_write=on_write)
        self._maint: asyncio.Task[None] | None = None

    async def open(self, auto_migrate: bool = True, maintain: bool = True) -> int:
        """Check (and with auto_migrate, upgrade) the schema, then start the writer and the
        hourly retention task. Raises SchemaTooOld / SchemaTooNew / StoreError."""
        version = await self.store.migrate(auto=auto_migrate)
        await self.start()
        if maintain and self._maint is None:
            self._maint = asyncio.create_task(self._maintain(), name="ledger-maintenance")
        return version

    async def _maintain(self) -> None:
        while True:
            try:
                n = await self.store.maintain(time.time(), self.retention_days)
                if n:
                    log.info("ledger retention: %d records older than %d days deleted",
                             n, self.retention_days)
            except Exception as exc:   # retried next hour; the writer reports outages
                log.warning("ledger maintenance failed: %s", exc)
            await asyncio.sleep(MAINTAIN_EVERY_S)

    def submit(self, rec: UsageRecord) -> None:
        """Queue a record for the background writer: O(1), never blocks, never raises."""
        self._writer.submit(rec)

    async def start(self) -> None:
        """Start the background writer (no schema check: `open` does both)."""
        await self._writer.start()

    async def flush(self, timeout: float = 1.0) -> bool:
        """Write the records submitted so far now and wait for them (see Writer.flush)."""
        return await self._writer.flush(timeout)

    async def drain(self, timeout: float) -> bool:
        """Wait until the backlog is empty; True if it emptied within `timeout` seconds."""
        return await self._writer.drain(timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Drain (up to `timeout`), stop the writer and close the store."""
        if self._maint is not None:
            self._maint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maint
            self._maint = None
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

    async def ready(self) -> None:
        """Raise unless the ledger accepts writes: its last write succeeded and it answers."""
        if self._writer.failing:
            raise RuntimeError("ledger writes are failing")
        await self.store.ping()

    async def summary(self, key: str, user: str, now: float) -> dict[str, UsageJSON]:
        """GET /usage: {"day", "month", "user_day", "user_month"} usage objects (UTC windows).
        Like every read here, it first flushes this process's queued records (READ_FLUSH_S at
        most), so a client sees its own request right after the answer."""
        await self._writer.flush(READ_FLUSH_S)
        return await summary(self.store, key, user, now)

    async def consumption(self, now: float) -> list[tuple[str, str, int, int, int]]:
        """This month's (user, key, epoch day, tokens, cost_nano), for budgets at start."""
        return await consumption(self.store, now)

    async def query(self, *, user: str | None = None, key: str | None = None,
                    team: str | None = None, model: str | None = None,
                    provider: str | None = None,
                    since: date | datetime | None = None, until: date | datetime | None = None,
                    group_by: Sequence[str] = ()) -> dict[str, Any]:
        """GET /admin/usage: {"group_by", "rows", "total"}; rows sorted by their group fields.

        `since` is inclusive, `until` exclusive; a plain `date` means its whole UTC day (so
        until=date(2026, 11, 30) includes the 30th); naive datetimes are UTC. Raises
        QueryError (a ValueError) for a group_by field outside GROUP_FIELDS or a date out of range.
        """
        filters = {"user": user, "key": key, "team": team, "model": model, "provider": provider}
        await self._writer.flush(READ_FLUSH_S)
        return await run_query(self.store, filters=filters, since=since, until=until,
                               group_by=group_by)

    async def records(self, since_id: str | None, limit: int) -> dict[str, Any]:
        """GET /admin/usage/records: up to `limit` (1..10,000) records after `since_id`, oldest
        first, and the id to pass next. Raises ValueError for a malformed since_id."""
        limit = max(1, min(limit, MAX_RECORDS_PAGE))
        after = parse_record_id(since_id) if since_id else 0
        await self._writer.flush(READ_FLUSH_S)
        page = await self.store.records(after, limit)
        nxt = str(page[-1][0]) if page else str(after)
        return {"records": [record_json(i, r) for i, r in page], "next_since_id": nxt}
