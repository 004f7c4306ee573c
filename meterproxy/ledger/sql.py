"""SQL shared by both backends: rows to and from records, a batch's aggregate deltas, and the
aggregate queries behind /usage, /admin/usage and `meterproxy usage` (`?` placeholders; the
PostgreSQL store renumbers them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from meterproxy.ledger.record import COUNTERS, Totals, UsageRecord, day_num
from meterproxy.ledger.schema import RECORD_COLUMNS

# /admin/usage field -> column (the same name in usage_daily and records, bar `day`)
COLUMNS = {"user": "user_id", "key": "key_id", "team": "team", "model": "model",
           "provider": "provider", "day": "day"}
FILTERS = ("user", "key", "team", "model", "provider")
Row = tuple[Any, ...]


def unique(batch: Iterable[UsageRecord]) -> list[UsageRecord]:
    """The batch without repeats of a dedupe_id (first one kept), in order."""
    seen: set[str] = set()
    out = []
    for r in batch:
        if r.dedupe_id not in seen:
            seen.add(r.dedupe_id)
            out.append(r)
    return out


def record_row(r: UsageRecord) -> Row:
    """A record as a row in RECORD_COLUMNS order."""
    tags = orjson.dumps(dict(r.tags)).decode() if r.tags else "{}"
    return (r.dedupe_id, r.request_id, r.time, r.key, r.user, r.team, r.provider, r.model,
            r.status, r.source, r.duration_ms, r.prompt_tokens, r.cached_prompt_tokens,
            r.cache_write_tokens, r.completion_tokens, r.reasoning_tokens, r.cost_nano,
            r.provider_cost_nano, tags)


def row_record(row: Sequence[Any]) -> UsageRecord:
    """A row in RECORD_COLUMNS order back to a record."""
    (uid, request_id, t, key, user, team, provider, model, status, source, duration_ms,
     pt, cpt, cwt, ct, rt, cost, pcost, tags) = row
    pairs = tuple(sorted(orjson.loads(tags).items())) if tags and tags != "{}" else ()
    return UsageRecord(
        request_id=request_id, time=t, key=key, user=user, provider=provider, model=model,
        status=status, source=source, duration_ms=duration_ms, prompt_tokens=pt,
        cached_prompt_tokens=cpt, completion_tokens=ct, reasoning_tokens=rt, cost_nano=cost,
        uid=uid, team=team, cache_write_tokens=cwt, provider_cost_nano=pcost, tags=pairs)


def daily_deltas(recs: Iterable[UsageRecord]) -> list[Row]:
    """What a set of (newly inserted) records adds to usage_daily: one row per cell,
    (day, key, user, team, provider, model, *COUNTERS)."""
    cells: dict[tuple[int, str, str, str, str, str], Totals] = {}
    for r in recs:
        k = (day_num(r.time), r.key, r.user, r.team, r.provider, r.model)
        t = cells.get(k)
        if t is None:
            cells[k] = t = Totals()
        t.add(Totals.of(r))
    return [(*k, *t.values()) for k, t in cells.items()]


INSERT_RECORD = (f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(RECORD_COLUMNS))})")
UPSERT_DAILY = (
    "INSERT INTO usage_daily AS d (day, key_id, user_id, team, provider, model, "
    f"{', '.join(COUNTERS)}) VALUES ({', '.join('?' * (6 + len(COUNTERS)))}) "
    "ON CONFLICT (day, key_id, user_id, team, provider, model) DO UPDATE SET "
    + ", ".join(f"{c} = d.{c} + excluded.{c}" for c in COUNTERS))
SELECT_RECORDS = f"SELECT seq, {', '.join(RECORD_COLUMNS)} FROM records"
LAST_ID = "SELECT coalesce(max(seq), 0) FROM records"


def records_query(after: int, limit: int, start: float | None, end: float | None) -> tuple[str, list[Any]]:
    """Up to `limit` records after id `after` with start <= time < end, oldest first: rows of
    (seq, *RECORD_COLUMNS) for row_record."""
    where, params = ["seq > ?"], list[Any]([after])
    if start is not None:
        where.append("time >= ?")
        params.append(float(start))
    if end is not None:
        where.append("time < ?")
        params.append(float(end))
    return f"{SELECT_RECORDS} WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?", [*params, limit]


def aggregate_query(group_by: Sequence[str], filters: Mapping[str, str | None],
                    first: int | None, last: int | None) -> tuple[str, list[Any]]:
    """SUM of the daily aggregates over days first..last (inclusive), grouped and filtered:
    rows of (*group values, *COUNTERS)."""
    where, params = _where(filters)
    if first is not None:
        where.append("day >= ?")
        params.append(first)
    if last is not None:
        where.append("day <= ?")
        params.append(last)
    cols = [COLUMNS[g] for g in group_by]
    sums = [f"SUM({c})" for c in COUNTERS]
    return _select(cols, sums, "usage_daily", where, cols), params


def records_aggregate_query(group_by: Sequence[str], filters: Mapping[str, str | None],
                            start: float, end: float, day_expr: str) -> tuple[str, list[Any]]:
    """The same rows from the records with start <= time < end (partial days only)."""
    where, params = _where(filters)
    where += ["time >= ?", "time < ?"]
    params += [start, end]
    cols = [day_expr if g == "day" else COLUMNS[g] for g in group_by]
    sums = ["COUNT(*)", *(f"SUM({c})" for c in COUNTERS[1:])]
    return _select(cols, sums, "records", where, cols), params


def _where(filters: Mapping[str, str | None]) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for f in FILTERS:
        v = filters.get(f)
        if v is not None:
            where.append(f"{COLUMNS[f]} = ?")
            params.append(v)
    return where, params


def _select(cols: list[str], sums: list[str], table: str, where: list[str],
            group: list[str]) -> str:
    sql = f"SELECT {', '.join([*cols, *sums])} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if group:
        sql += " GROUP BY " + ", ".join(group)
    return sql
