"""Stores: one place owns store URLs, client construction and the mapping of driver errors.

    with store_errors("admit"):          # any driver's failure -> StoreError("admit", ...)
        await client.execute_command(...)

`StoreError` is backend-neutral: the limiter, the ledger and async-run ownership raise it, the
request path turns it into `on_error` behaviour, the admin endpoints into 503. Only failures of
the *store* map (connection lost, timeout, the database refusing service); a programming error
(a bad SQL statement, a RuntimeError of our own) propagates as itself, so it is never mistaken
for an outage and hidden behind `on_error: open`.
"""

from __future__ import annotations

import sqlite3
from types import TracebackType

import asyncpg
from redis.exceptions import RedisError

__all__ = ["StoreError", "is_store_failure", "store_errors"]


class StoreError(Exception):
    """The store could not be reached or answered in time (backend-neutral)."""

    def __init__(self, operation: str, message: str = "") -> None:
        super().__init__(f"{operation}: {message}" if message else operation)
        self.operation = operation


# PostgreSQL errors that are about the server, not about our statements: connection failures,
# the server shutting down or refusing connections, resource exhaustion, lock/serialization
# conflicts. Syntax, undefined table/column, constraint and data errors are bugs: not mapped.
_PG_OUTAGE = (
    asyncpg.InterfaceError,                     # connection closed / not usable
    asyncpg.PostgresConnectionError,            # class 08
    asyncpg.OperatorInterventionError,          # class 57: admin shutdown, cannot connect now
    asyncpg.InsufficientResourcesError,         # class 53: disk full, too many connections
    asyncpg.TransactionRollbackError,           # class 40: serialization failure, deadlock
    asyncpg.InternalServerError,                # class XX
)
# SQLite: "database is locked", I/O and disk errors are OperationalError; ProgrammingError,
# IntegrityError and InterfaceError are ours.
_FAILURES = (RedisError, OSError, sqlite3.OperationalError, *_PG_OUTAGE)
# What uvloop raises when a driver writes to a transport closed under it (a Redis or PostgreSQL
# restart during connect): a RuntimeError, but an outage. Matched by its message only; any other
# RuntimeError is a bug.
_CLOSED_HANDLER = "handler is closed"


def is_store_failure(exc: BaseException) -> bool:
    """True when `exc` means the store failed (not a programming error)."""
    if isinstance(exc, _FAILURES):
        return True
    return isinstance(exc, RuntimeError) and _CLOSED_HANDLER in str(exc)


class store_errors:  # lowercase: used like a function, `with store_errors("op"):`
    """Context manager: a store failure inside becomes StoreError(operation). Stateless, so one
    instance per operation can be kept and reused on the hot path (no allocation per call)."""

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, StoreError) and is_store_failure(exc):
            raise StoreError(self.operation, f"{type(exc).__name__}: {exc}") from exc
