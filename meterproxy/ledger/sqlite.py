"""SQLite ledger store: the standard library's sqlite3 on one writer thread per process.

Why the stdlib driver on a thread rather than aiosqlite: aiosqlite is the same thing (a thread per
connection) plus a queue per call; one dedicated executor thread owns the connection, so every
statement of a batch runs there without hopping back to the event loop. WAL mode lets readers
(`meterproxy usage`, other workers) read while a batch commits; `BEGIN IMMEDIATE` plus a busy
timeout serialise writers across `--workers N` processes on the same file. synchronous=FULL: a
committed batch survives a power cut, which a finance ledger wants more than the fsync it costs
per batch (the writer batches whatever queued during the previous commit).
"""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from meterproxy.ledger import sql
from meterproxy.ledger.record import UsageRecord
from meterproxy.ledger.schema import CURRENT_VERSION, LATEST, RECORD_VERSION, SQLITE, VERSION_TABLE, pending
from meterproxy.store import store_errors

T = TypeVar("T")
RETENTION_BATCH = 1000   # rows per DELETE: each a short transaction, so writers never wait long


class SqliteStore:
    """A ledger in one SQLite file (see the module docstring)."""

    def __init__(self, path: str, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._busy_s = busy_timeout_s
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="ledger-sqlite")
        self._db: sqlite3.Connection | None = None
        self._leases: dict[str, IO[bytes]] = {}
        self._closed = False

    async def _run(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        with store_errors(op):
            return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._busy_s, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._db = db
        return self._db

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    # -- schema
    async def migrate(self, auto: bool = True, target: int | None = None) -> int:
        return await self._run("ledger_migrate", self._migrate, auto, target or LATEST)

    def _migrate(self, auto: bool, target: int) -> int:
        self._conn().execute(VERSION_TABLE)

        def up(db: sqlite3.Connection) -> int:
            cur = int(db.execute(CURRENT_VERSION).fetchone()[0])
            for v in pending(cur, target, auto):
                for stmt in SQLITE[v]:
                    db.execute(stmt)
                db.execute(RECORD_VERSION, (v, datetime.now(UTC).isoformat()))
            return max(cur, target)

        return self._tx(up)

    # -- writes
    async def write(self, batch: Sequence[UsageRecord]) -> int:
        return await self._run("ledger_write", self._tx, lambda db: self._write(db, batch))

    def _write(self, db: sqlite3.Connection, batch: Sequence[UsageRecord]) -> int:
        recs = sql.unique(batch)
        ids = [r.dedupe_id for r in recs]
        have: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            have.update(u for (u,) in db.execute(
                f"SELECT uid FROM records WHERE uid IN ({','.join('?' * len(chunk))})", chunk))
        new = [r for r in recs if r.dedupe_id not in have]
        db.executemany(sql.INSERT_RECORD, [sql.record_row(r) for r in new])
        db.executemany(sql.UPSERT_DAILY, sql.daily_deltas(new))
        return len(new)

    # -- reads
    def _fetch(self, q: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._conn().execute(q, params).fetchall()

    async def aggregate(self, group_by: Sequence[str], filters: Mapping[str, str | None],
                        first: int | None, last: int | None) -> list[tuple[Any, ...]]:
        q, p = sql.aggregate_query(group_by, filters, first, last)
        return await self._run("ledger_read", self._fetch, q, p)

    async def aggregate_records(self, group_by: Sequence[str], filters: Mapping[str, str | None],
                                start: float, end: float) -> list[tuple[Any, ...]]:
        # CAST truncates toward zero: the floor for the (positive) epoch times records hold
        q, p = sql.records_aggregate_query(group_by, filters, start, end, "CAST(time / 86400 AS integer)")
        return await self._run("ledger_read", self._fetch, q, p)

    async def records(self, after: int, limit: int, start: float | None = None,
                      end: float | None = None) -> list[tuple[int, UsageRecord]]:
        q, p = sql.records_query(after, limit, start, end)
        rows = await self._run("ledger_read", self._fetch, q, p)
        return [(int(r[0]), sql.row_record(r[1:])) for r in rows]

    async def last_id(self) -> int:
        rows = await self._run("ledger_read", self._fetch, sql.LAST_ID, ())
        return int(rows[0][0])

    async def cursor(self, exporter: str) -> int:
        rows = await self._run("ledger_read", self._fetch,
                               "SELECT seq FROM export_cursors WHERE exporter = ?", (exporter,))
        return int(rows[0][0]) if rows else 0

    async def set_cursor(self, exporter: str, record_id: int) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO export_cursors VALUES (?, ?) ON CONFLICT (exporter) "
                       "DO UPDATE SET seq = max(seq, excluded.seq)", (exporter, record_id))
        await self._run("ledger_cursor", self._tx, put)

    async def maintain(self, now: float, retention_days: int) -> int:
        cutoff = now - retention_days * 86_400
        deleted = 0
        while True:   # small transactions, each its own executor call: writes interleave
            n: int = await self._run("ledger_retention", self._tx, lambda db: int(db.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE time < ? "
                "ORDER BY seq LIMIT ?)", (cutoff, RETENTION_BATCH)).rowcount))
            deleted += n
            if n < RETENTION_BATCH:
                return deleted

    async def exporter_lease(self, exporter: str) -> bool:
        """True while this process holds the exporter's lock file beside the database (one
        exporting process per exporter among the --workers N processes on this file)."""
        if exporter in self._leases:
            return True
        f = open(f"{self.path}.export-{exporter}.lock", "ab")  # noqa: SIM115 (held while leased)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._leases[exporter] = f
        return True

    async def ping(self) -> None:
        await self._run("ledger_ping", self._fetch, "SELECT 1", ())

    async def close(self) -> None:
        """Release the connection and the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for f in self._leases.values():
            f.close()
        self._leases.clear()

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await asyncio.get_running_loop().run_in_executor(self._exec, shut)
        self._exec.shutdown(wait=False)
