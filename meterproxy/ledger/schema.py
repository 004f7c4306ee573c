"""The ledger's SQL schema as versioned migrations, one list per dialect (SQLite, PostgreSQL).

Version 1: records (idempotent by uid; PostgreSQL: partitioned by month on `time`) and the
daily aggregates per (day, key, user, team, provider, model). Version 2: exporter cursors, and
an index for the per-user reads of /usage and the budget rebuild. A migration never edits an
earlier one: a ledger at version N is brought to LATEST by running N+1..LATEST in order, each in
its own transaction, recorded in `meterproxy_schema`.
"""

from __future__ import annotations

# Column order of a record row (after `seq`), shared by both backends' INSERT and SELECT.
RECORD_COLUMNS = (
    "uid", "request_id", "time", "key_id", "user_id", "team", "provider", "model", "status",
    "source", "duration_ms", "prompt_tokens", "cached_prompt_tokens", "cache_write_tokens",
    "completion_tokens", "reasoning_tokens", "cost_nano", "provider_cost_nano", "tags",
)
DIMENSIONS = ("day", "key_id", "user_id", "team", "provider", "model")

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS meterproxy_schema (version integer PRIMARY KEY, applied_at text NOT NULL)"

_DAILY = """CREATE TABLE usage_daily (
    day integer NOT NULL, key_id text NOT NULL, user_id text NOT NULL, team text NOT NULL,
    provider text NOT NULL, model text NOT NULL,
    requests bigint NOT NULL, prompt_tokens bigint NOT NULL, cached_prompt_tokens bigint NOT NULL,
    cache_write_tokens bigint NOT NULL, completion_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL, cost_nano bigint NOT NULL,
    PRIMARY KEY (day, key_id, user_id, team, provider, model))"""

_RECORD_BODY = """uid text NOT NULL, request_id text NOT NULL, time double precision NOT NULL,
    key_id text NOT NULL, user_id text NOT NULL, team text NOT NULL, provider text NOT NULL,
    model text NOT NULL, status integer NOT NULL, source text NOT NULL, duration_ms integer NOT NULL,
    prompt_tokens bigint NOT NULL, cached_prompt_tokens bigint NOT NULL,
    cache_write_tokens bigint NOT NULL, completion_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL, cost_nano bigint NOT NULL, provider_cost_nano bigint,
    tags text NOT NULL"""

_V2_CURSORS = "CREATE TABLE export_cursors (exporter text PRIMARY KEY, seq bigint NOT NULL)"
_V2_USER_DAY = "CREATE INDEX usage_daily_user ON usage_daily (user_id, day)"

SQLITE: dict[int, list[str]] = {
    1: [
        f"CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, {_RECORD_BODY}, UNIQUE (uid))",
        "CREATE INDEX records_time ON records (time)",
        _DAILY,
    ],
    2: [_V2_CURSORS, _V2_USER_DAY],
}

# PostgreSQL: a partitioned table's unique keys must hold the partition key, so idempotency is
# on (uid, time): a retried record carries its own time, hence lands on the same row. `seq`
# comes from a sequence taken under the writers' advisory lock, so it grows in commit order and
# keyset readers (/admin/usage/records, exporters) never skip a record committed late.
POSTGRES: dict[int, list[str]] = {
    1: [
        "CREATE SEQUENCE records_seq",
        f"CREATE TABLE records (seq bigint NOT NULL DEFAULT nextval('records_seq'), {_RECORD_BODY}, "
        "PRIMARY KEY (uid, time)) PARTITION BY RANGE (time)",
        "CREATE INDEX records_seq_idx ON records (seq)",
        "CREATE INDEX records_time_idx ON records (time)",
        _DAILY,
    ],
    2: [_V2_CURSORS, _V2_USER_DAY],
}

LATEST = max(SQLITE)
assert set(SQLITE) == set(POSTGRES) == set(range(1, LATEST + 1))


class SchemaTooOld(Exception):
    """The ledger's schema is older than this meterproxy and `ledger.migrate` is manual."""

    def __init__(self, current: int) -> None:
        super().__init__(
            f"the ledger schema is at version {current}, this meterproxy needs {LATEST}: run "
            f"`meterproxy ledger migrate --config FILE` (ledger.migrate is manual)")
        self.current = current


class SchemaTooNew(Exception):
    """The ledger was migrated by a newer meterproxy."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the ledger schema is at version {current}, newer than this "
                         f"meterproxy knows ({LATEST}): upgrade meterproxy")


CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM meterproxy_schema"
RECORD_VERSION = "INSERT INTO meterproxy_schema VALUES (?, ?)"   # (version, applied_at ISO)


def pending(current: int, target: int, auto: bool) -> range:
    """The versions to apply to bring a schema at `current` to `target`, for every backend:
    none past what this meterproxy knows, and none at all unless migrations are automatic."""
    if current > LATEST:
        raise SchemaTooNew(current)
    if current < target and not auto:
        raise SchemaTooOld(current)
    return range(current + 1, target + 1)
