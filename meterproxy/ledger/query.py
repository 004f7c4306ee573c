"""Admin usage queries and the /usage summary, over any LedgerStore.

A time range is split into whole UTC days, answered from the day aggregates, and at most two
partial days (a `since` or `until` with a time of day), answered from the records themselves —
so sub-day precision is bounded by the records' retention (the capped stream), whole days are
not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from meterproxy.ledger.record import (
    DAY_S,
    Cell,
    LedgerStore,
    Totals,
    UsageJSON,
    UsageRecord,
    day_num,
    day_str,
    month_str,
)

GROUP_FIELDS = ("user", "key", "model", "provider", "day")
_LAST_US = time(23, 59, 59, 999_999)


@dataclass(slots=True)
class Plan:
    """Whole days first..last (inclusive, None: unbounded) plus partial [start, end) ranges."""

    first: int | None = None
    last: int | None = None
    whole_days: bool = True
    partials: list[tuple[float, float]] = field(default_factory=list)


def _instant(d: date | datetime, *, end: bool) -> float:
    """Epoch seconds of a bound. A plain date means its whole UTC day: since = its start,
    until = the end of that day (so until=2026-11-30 includes the 30th). A datetime is an
    instant (naive means UTC); until is exclusive, except that an until of 23:59:59.999999 is
    read as the end of that day, so the common "inclusive end of day" idiom stays a whole day
    (answered from the aggregates) rather than a partial one."""
    if not isinstance(d, datetime):
        d = datetime.combine(d + timedelta(days=1) if end else d, time(), UTC)
    elif d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    d = d.astimezone(UTC)
    if end and d.time() == _LAST_US:
        d += timedelta(microseconds=1)
    return d.timestamp()


def plan(since: date | datetime | None, until: date | datetime | None) -> Plan:
    """Split [since, until) into whole days and partial-day ranges."""
    s = None if since is None else _instant(since, end=False)
    u = None if until is None else _instant(until, end=True)
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


def _rec_cells(recs: Iterable[UsageRecord]) -> list[Cell]:
    return [Cell(r.user, r.key, r.provider, r.model, day_str(day_num(r.time)), Totals.of(r))
            for r in recs]


def _dim(c: Cell, name: str) -> str:
    return c.period if name == "day" else str(getattr(c, name))


def group(cells: Iterable[Cell], group_by: Sequence[str],
          filters: dict[str, str | None]) -> dict[str, Any]:
    """Filter cells, group them by `group_by` and sum: the /admin/usage body."""
    rows: dict[tuple[str, ...], Totals] = {}
    total = Totals()
    for c in cells:
        if any(v is not None and getattr(c, f) != v for f, v in filters.items()):
            continue
        rows.setdefault(tuple(_dim(c, g) for g in group_by), Totals()).add(c.totals)
        total.add(c.totals)
    out_rows = [{**dict(zip(group_by, k, strict=True)), **t.json()}
                for k, t in sorted(rows.items())]
    return {"group_by": list(group_by), "rows": out_rows, "total": total.json()}


async def run_query(store: LedgerStore, *, user: str | None, key: str | None,
                    model: str | None, provider: str | None, since: date | datetime | None,
                    until: date | datetime | None, group_by: Sequence[str]) -> dict[str, Any]:
    """GET /admin/usage: totals over the range, filtered and grouped (rows sorted by group)."""
    bad = [g for g in group_by if g not in GROUP_FIELDS]
    if bad:
        raise ValueError(f"group_by: unknown field(s) {', '.join(bad)}; "
                         f"allowed: {', '.join(GROUP_FIELDS)}")
    group_by = list(dict.fromkeys(group_by))
    p = plan(since, until)
    cells: list[Cell] = []
    if p.whole_days:
        cells += await store.day_cells(user, p.first, p.last)
    for start, end in p.partials:
        cells += _rec_cells(await store.scan(start, end))
    filters = {"user": user, "key": key, "model": model, "provider": provider}
    return group(cells, group_by, filters)


async def summary(store: LedgerStore, key: str, user: str, now: float) -> dict[str, UsageJSON]:
    """GET /usage windows: the key's and the user's usage today and this month (UTC)."""
    day_cells, month_cells = await store.period_cells(
        user, [day_str(day_num(now)), month_str(now)])

    def total(cells: list[Cell], only_key: str | None) -> UsageJSON:
        t = Totals()
        for c in cells:
            if only_key is None or c.key == only_key:
                t.add(c.totals)
        return t.json()

    return {"day": total(day_cells, key), "month": total(month_cells, key),
            "user_day": total(day_cells, None), "user_month": total(month_cells, None)}
