"""store_errors: the one place driver errors become StoreError, and only store failures do."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
import redis.exceptions

from meterproxy.ledger import open_ledger_store
from meterproxy.store import StoreError, is_store_failure, store_errors
from meterproxy.store.sql import redact, sqlite_path

OUTAGES = [
    redis.exceptions.ConnectionError("refused"), redis.exceptions.TimeoutError("slow"),
    ConnectionResetError(), TimeoutError(), sqlite3.OperationalError("database is locked"),
    asyncpg.CannotConnectNowError("starting up"), asyncpg.AdminShutdownError("shutdown"),
    asyncpg.ConnectionDoesNotExistError("closed"), asyncpg.InterfaceError("pool is closing"),
    asyncpg.TooManyConnectionsError("too many"),
    RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed"),
]
BUGS = [
    RuntimeError("dictionary changed size during iteration"), KeyError("x"), TypeError("bad arg"),
    sqlite3.ProgrammingError("closed database"), sqlite3.IntegrityError("NOT NULL"),
    asyncpg.UndefinedTableError("no such table"), asyncpg.PostgresSyntaxError("syntax"),
]


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: type(e).__name__)
def test_store_failures_map(exc: BaseException) -> None:
    assert is_store_failure(exc)
    with pytest.raises(StoreError) as err, store_errors("op"):
        raise exc
    assert err.value.operation == "op" and err.value.__cause__ is exc


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_programming_errors_propagate(exc: BaseException) -> None:
    assert not is_store_failure(exc)
    with pytest.raises(type(exc)) as err, store_errors("op"):
        raise exc
    assert err.value is exc


def test_store_error_passes_through_unchanged() -> None:
    inner = StoreError("inner")
    with pytest.raises(StoreError) as err, store_errors("outer"):
        raise inner
    assert err.value is inner


def test_urls() -> None:
    assert str(sqlite_path("sqlite:///var/lib/mp/l.db", "/etc")) == "/var/lib/mp/l.db"
    assert str(sqlite_path("sqlite://data/l.db", "/etc/mp")) == "/etc/mp/data/l.db"
    assert redact("postgresql://mp:s3cr%40t@db:5432/mp") == "postgresql://mp:***@db:5432/mp"
    assert "s3cret" not in open_ledger_store("postgresql://u:s3cret@h/db").url
    with pytest.raises(ValueError):
        open_ledger_store("mysql://h/db")


def test_redact_every_password_form() -> None:
    assert redact("postgresql://mp:s3cret@db:5432/mp") == "postgresql://mp:***@db:5432/mp"
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("postgresql://db/mp?user=a&password=s3cret") == "postgresql://db/mp?user=a&password=***"
