"""Admin usage queries, the /usage summary and the budget rebuild, over any LedgerStore.

A time range is split into whole UTC days, answered from the daily aggregates, and at most two
partial days (a `since` or `until` with a time of day), answered from the records of those hours
(an index range on `time`) — so sub-day precision is bounded by the records' retention, whole
days are not. Grouping and filtering run in SQL; rows of the two sources are merged here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from meterproxy.ledger.record import DAY_S, Totals, UsageJSON, day_num, day_str, month_first_day
from meterproxy.ledger.store import LedgerStore

GROUP_FIELDS = ("user", "key", "team", "model", "provider", "day")
# Instants outside these bounds are refused (400): years 1..9999 do not fit an epoch day range
# every backend and datetime arithmetic can hold at both ends.
MIN_T = datetime(1970, 1, 1, tzinfo=UTC).timestamp()
MAX_T = datetime(9999, 1, 1, tzinfo=UTC).timestamp()
_LAST_US = time(23, 59, 59, 999_999)
_OUT_OF_RANGE = "date out of range (1970-01-01 .. 9998-12-31)"


class QueryError(ValueError):
    """A query the ledger cannot answer, the caller's error; `param` names the argument at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def parse_bound(value: str | None, name: str) -> date | datetime | None:
    """A since/until as given by a client (API query, CLI): an ISO date (its whole UTC day, see
    `instant`) or an ISO datetime (naive or Z means UTC)."""
    if not value:
        return None
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (ValueError, OverflowError) as exc:   # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise QueryError(name, "not an ISO date or datetime in range") from exc


@dataclass(slots=True)
class Plan:
    """Whole days first..last (inclusive, None: unbounded) plus partial [start, end) ranges."""

    first: int | None = None
    last: int | None = None
    whole_days: bool = True
    partials: list[tuple[float, float]] = field(default_factory=list)


def instant(d: date | datetime, *, end: bool) -> float:
    """Epoch seconds of a bound. A plain date means its whole UTC day: since = its start,
    until = the end of that day (so until=2026-11-30 includes the 30th). A datetime is an
    instant (naive means UTC); until is exclusive, except that an until of 23:59:59.999999 is
    read as the end of that day, so a client's "inclusive end of day" idiom stays a whole day
    (answered from the aggregates) rather than a partial one. Raises QueryError out of range."""
    try:
        if not isinstance(d, datetime):
            d = datetime.combine(d + timedelta(days=1) if end else d, time(), UTC)
        elif d.tzinfo is None:
            d = d.replace(tzinfo=UTC)
        d = d.astimezone(UTC)
        if end and d.time() == _LAST_US:
            d += timedelta(microseconds=1)
        t = d.timestamp()
    except (OverflowError, ValueError) as exc:   # 9999-12-31 + 1 day, 0001-01-01 at +01:00
        raise QueryError("until" if end else "since", _OUT_OF_RANGE) from exc
    if not MIN_T <= t <= MAX_T:
        raise QueryError("until" if end else "since", _OUT_OF_RANGE)
    return t


def plan(since: date | datetime | None, until: date | datetime | None) -> Plan:
    """Split [since, until) into whole days and partial-day ranges."""
    s = None if since is None else instant(since, end=False)
    u = None if until is None else instant(until, end=True)
    p = Plan()
    if s is not None and u is not None and u <= s:
        p.whole_days = False
        return p
    if s is not None:
        p.first = day_num(s)
        if s % DAY_S:
            head_end = (p.first + 1) * DAY_S
            if u is not None and u <= head_end:
                p.whole_days = False
                p.partials.append((s, u))
                return p
            p.partials.append((s, float(head_end)))
            p.first += 1
    if u is not None:
        p.last = day_num(u) - 1
        if u % DAY_S:
            p.partials.append((float((p.last + 1) * DAY_S), u))
    if p.first is not None and p.last is not None and p.first > p.last:
        p.whole_days = False
    return p


def _key(row: tuple[Any, ...], group_by: Sequence[str]) -> tuple[str, ...]:
    return tuple(day_str(int(v)) if g == "day" else str(v) for g, v in zip(group_by, row, strict=False))


async def run_query(store: LedgerStore, *, filters: dict[str, str | None],
                    since: date | datetime | None, until: date | datetime | None,
                    group_by: Sequence[str]) -> dict[str, Any]:
    """GET /admin/usage: totals over the range, filtered and grouped (rows sorted by group).
    Raises QueryError for an unknown group_by field or a date out of range."""
    bad = [g for g in group_by if g not in GROUP_FIELDS]
    if bad:
        raise QueryError("group_by", f"unknown field {bad[0]!r}; use {','.join(GROUP_FIELDS)}")
    group_by = list(dict.fromkeys(group_by))
    p = plan(since, until)
    rows: list[tuple[Any, ...]] = []
    if p.whole_days:
        rows += await store.aggregate(group_by, filters, p.first, p.last)
    for start, end in p.partials:
        rows += await store.aggregate_records(group_by, filters, start, end)
    n = len(group_by)
    merged: dict[tuple[str, ...], Totals] = {}
    total = Totals()
    for row in rows:
        if not row[n]:   # SUM over no rows: one row of NULLs
            continue
        t = merged.setdefault(_key(row, group_by), Totals())
        t.add_values(row[n:])
        total.add_values(row[n:])
    out_rows = [{**dict(zip(group_by, k, strict=True)), **t.json()} for k, t in sorted(merged.items())]
    return {"group_by": group_by, "rows": out_rows, "total": total.json()}


async def summary(store: LedgerStore, key: str, user: str, now: float) -> dict[str, UsageJSON]:
    """GET /usage windows: the key's and the user's usage today and this month (UTC)."""
    today = day_num(now)
    first = month_first_day(today)
    rows = await store.aggregate(["day", "key"], {"user": user}, first, month_first_day(first + 31) - 1)
    out = {w: Totals() for w in ("day", "month", "user_day", "user_month")}
    for day, k, *counters in rows:
        for w in ("month", "user_month", "day", "user_day"):
            if (w.startswith("user") or k == key) and (w.endswith("month") or int(day) == today):
                out[w].add_values(counters)
    return {w: t.json() for w, t in out.items()}


async def consumption(store: LedgerStore, now: float) -> list[tuple[str, str, int, int, int]]:
    """This month's usage per (user, key, day): (user, key, day, tokens, cost_nano), for the
    in-process limiter's budgets at start."""
    first = month_first_day(day_num(now))
    rows = await store.aggregate(["user", "key", "day"], {}, first, month_first_day(first + 31) - 1)
    # counters: requests, prompt, cached, cache_write, completion, reasoning, cost
    return [(u, k, int(d), int(c[1]) + int(c[4]), int(c[6])) for u, k, d, *c in rows]
