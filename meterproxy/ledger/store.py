"""The contract both ledger stores (sqlite.py, postgres.py) implement; tests/test_ledger.py runs
one test class over both. Every method may raise StoreError when the database fails."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from meterproxy.ledger.record import UsageRecord


class LedgerStore(Protocol):
    url: str   # for logs: without a password

    async def migrate(self, auto: bool = True, target: int | None = None) -> int:
        """Bring the schema to `target` (default LATEST) and return the version reached. With
        auto=False, raise SchemaTooOld instead of changing an older schema."""
        ...

    async def write(self, batch: Sequence[UsageRecord]) -> int:
        """Insert the batch and add it to the daily aggregates in one transaction; records whose
        dedupe_id is already stored are skipped (a retried batch never counts twice). Returns
        how many were new."""
        ...

    async def aggregate(self, group_by: Sequence[str], filters: Mapping[str, str | None],
                        first: int | None, last: int | None) -> list[tuple[Any, ...]]:
        """Daily aggregates of days first..last, grouped: rows of (*group values, *COUNTERS)."""
        ...

    async def aggregate_records(self, group_by: Sequence[str], filters: Mapping[str, str | None],
                                start: float, end: float) -> list[tuple[Any, ...]]:
        """The same from the records with start <= time < end (used for partial days)."""
        ...

    async def records(self, after: int, limit: int, start: float | None = None,
                      end: float | None = None) -> list[tuple[int, UsageRecord]]:
        """Up to `limit` (id, record) with id > after, in id order (= commit order), optionally
        only those with start <= time < end."""
        ...

    async def last_id(self) -> int:
        """The highest record id so far (0 when empty)."""
        ...

    async def cursor(self, exporter: str) -> int:
        """An exporter's cursor: the last record id it delivered (0 at first)."""
        ...

    async def set_cursor(self, exporter: str, record_id: int) -> None:
        ...

    async def exporter_lease(self, exporter: str) -> bool:
        """True when this process may run the exporter now (one process at a time per exporter;
        a lease lost with its holder is taken over by another)."""
        ...

    async def maintain(self, now: float, retention_days: int) -> int:
        """Retention (and, on PostgreSQL, partitions ahead); returns records deleted."""
        ...

    async def ping(self) -> None:
        """A round trip to the database."""
        ...

    async def close(self) -> None:
        ...
