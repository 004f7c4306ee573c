"""Usage records, their totals, the wire shapes, and the store contract both backends implement."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Protocol, TypedDict

DAY_S = 86_400
_EPOCH = date(1970, 1, 1)
_ID_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request, as the ledger stores it. Costs are integer nano-USD (1e-9 USD)."""

    request_id: str
    time: float                 # epoch seconds, UTC
    key: str                    # key id
    user: str
    provider: str
    model: str
    status: int
    source: str                 # "provider" | "estimated"
    duration_ms: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_nano: int
    # Unique per request, internal: names the record for idempotent writes. request_id may
    # come from the client (x-request-id) and repeat, so it is only the fallback.
    uid: str = ""
    cache_write_tokens: int = 0
    provider_cost_nano: int | None = None

    @property
    def dedupe_id(self) -> str:
        """What makes a write of this record idempotent: uid, else request_id."""
        return self.uid or self.request_id


class UsageJSON(TypedDict):
    """The SPEC.md usage object, plus `cost_nano`: the exact integer cost, so sums never drift."""

    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_usd: float
    cost_nano: int


@dataclass(slots=True)
class Totals:
    """Summed usage of any number of records."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0

    @classmethod
    def of(cls, rec: UsageRecord) -> Totals:
        """The totals of one record."""
        return cls(1, rec.prompt_tokens, rec.cached_prompt_tokens, rec.completion_tokens,
                   rec.reasoning_tokens, rec.cost_nano)

    def values(self) -> tuple[int, int, int, int, int, int]:
        """The six counters in AGG_FIELDS order."""
        return (self.requests, self.prompt_tokens, self.cached_prompt_tokens,
                self.completion_tokens, self.reasoning_tokens, self.cost_nano)

    def add(self, other: Totals) -> None:
        """Add `other` into self."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.cached_prompt_tokens += other.cached_prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cost_nano += other.cost_nano

    def json(self) -> UsageJSON:
        """The wire usage object."""
        return UsageJSON(
            requests=self.requests, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            completion_tokens=self.completion_tokens, reasoning_tokens=self.reasoning_tokens,
            cost_usd=self.cost_nano / 1e9, cost_nano=self.cost_nano,
        )


# Short names of the aggregate counters, in Totals.values() order (they are stored per cell).
AGG_FIELDS = ("req", "pt", "cpt", "ct", "rt", "cost")


@dataclass(frozen=True, slots=True)
class Cell:
    """Summed usage of one (user, key, provider, model) in one period: "YYYY-MM-DD" or "YYYY-MM"."""

    user: str
    key: str
    provider: str
    model: str
    period: str
    totals: Totals = field(compare=False)


def day_num(t: float) -> int:
    """Days since the epoch of the UTC day holding `t`."""
    return int(t // DAY_S)


@functools.lru_cache(maxsize=1024)
def day_str(n: int) -> str:
    """ISO date of epoch day `n` (cached: every record asks, and days are few)."""
    return (_EPOCH + timedelta(days=n)).isoformat()


def month_str(t: float) -> str:
    """"YYYY-MM" of the UTC month holding `t`."""
    return _month_of_day(day_num(t))


@functools.lru_cache(maxsize=1024)
def _month_of_day(n: int) -> str:
    return day_str(n)[:7]


def parse_id(s: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" (or "<ms>") as a sortable pair; ValueError if malformed."""
    m = _ID_RE.match(s)
    if m is None:
        raise ValueError(f"invalid record id {s!r}: expected <ms>-<seq>")
    return int(m.group(1)), int(m.group(2) or 0)


def record_json(rid: str, rec: UsageRecord) -> dict[str, object]:
    """A record as GET /admin/usage/records returns it (`time` in epoch seconds, UTC)."""
    t = Totals.of(rec).json()
    return {
        "id": rid, "time": rec.time, "request_id": rec.request_id, "key": rec.key,
        "user": rec.user, "provider": rec.provider, "model": rec.model, "status": rec.status,
        "source": rec.source, "duration_ms": rec.duration_ms,
        "prompt_tokens": t["prompt_tokens"], "cached_prompt_tokens": t["cached_prompt_tokens"],
        "completion_tokens": t["completion_tokens"], "reasoning_tokens": t["reasoning_tokens"],
        "cost_usd": t["cost_usd"], "cost_nano": t["cost_nano"],
    }


class LedgerStore(Protocol):
    """Where records and aggregates live. Every method may raise limits.StoreError."""

    async def write(self, batch: Sequence[UsageRecord]) -> None:
        """Store a batch. Idempotent per dedupe_id (uid, else request_id): rewriting a record
        (a retry after a timeout that did commit) changes nothing."""
        ...

    async def day_cells(self, user: str | None, first: int | None,
                        last: int | None) -> list[Cell]:
        """Day aggregates of days first..last (epoch day numbers, inclusive; None: unbounded),
        of one user or of everyone."""
        ...

    async def period_cells(self, user: str, periods: Sequence[str]) -> list[list[Cell]]:
        """Aggregates of one user for each period ("YYYY-MM-DD" day or "YYYY-MM" month)."""
        ...

    async def scan(self, start: float, end: float) -> list[UsageRecord]:
        """Records with start <= time < end (bounded by the records' retention)."""
        ...

    async def records(self, since_id: str | None, limit: int) -> list[tuple[str, UsageRecord]]:
        """Up to `limit` (id, record) pairs with id > since_id, oldest first."""
        ...

    async def close(self) -> None:
        """Release resources (the caller owns any client it passed in)."""
        ...
