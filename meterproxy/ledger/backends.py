"""The ledger store for a URL (`sqlite://PATH`, `postgresql://…`; meterproxy/store/sql.py reads
the URL forms). Each backend is imported when its URL is first opened, so a SQLite ledger never
loads asyncpg."""

from __future__ import annotations

from pathlib import Path

from meterproxy.ledger.store import LedgerStore
from meterproxy.store.sql import SCHEMES, sqlite_path


def open_ledger_store(url: str, base_dir: str | Path = ".") -> LedgerStore:
    """The store for a ledger URL; opens nothing yet (the first call connects)."""
    if url.startswith("sqlite://"):
        from meterproxy.ledger.sqlite import SqliteStore

        return SqliteStore(str(sqlite_path(url, base_dir)))
    if url.startswith(("postgresql://", "postgres://")):
        from meterproxy.ledger.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported ledger URL scheme: must start with {', '.join(SCHEMES)}")
