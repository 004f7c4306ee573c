"""Usage records, their totals and the wire shapes (docs/api.md "Usage object" and "Record")."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TypedDict

DAY_S = 86_400
_EPOCH = date(1970, 1, 1)


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
    team: str = ""
    cache_write_tokens: int = 0                # part of prompt_tokens
    provider_cost_nano: int | None = None      # what the provider said it cost, if it did
    tags: tuple[tuple[str, str], ...] = ()     # (v0.3) x-meterproxy-tags, sorted pairs

    @property
    def dedupe_id(self) -> str:
        """What makes a write of this record idempotent: uid, else request_id."""
        return self.uid or self.request_id


class UsageJSON(TypedDict):
    """The usage object of docs/api.md, with `cost_nano`: the exact integer cost, so sums never drift."""

    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    cache_write_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_usd: float
    cost_nano: int


# The summed counters, in storage order (column names in both SQL schemas).
COUNTERS = ("requests", "prompt_tokens", "cached_prompt_tokens", "cache_write_tokens",
            "completion_tokens", "reasoning_tokens", "cost_nano")


@dataclass(slots=True)
class Totals:
    """Summed usage of any number of records."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0

    @classmethod
    def of(cls, rec: UsageRecord) -> Totals:
        """The totals of one record."""
        return cls(1, rec.prompt_tokens, rec.cached_prompt_tokens, rec.cache_write_tokens,
                   rec.completion_tokens, rec.reasoning_tokens, rec.cost_nano)

    def values(self) -> tuple[int, int, int, int, int, int, int]:
        """The counters in COUNTERS order."""
        return (self.requests, self.prompt_tokens, self.cached_prompt_tokens,
                self.cache_write_tokens, self.completion_tokens, self.reasoning_tokens,
                self.cost_nano)

    def add(self, other: Totals) -> None:
        """Add `other` into self."""
        self.add_values(other.values())

    def add_values(self, v: tuple[int, ...] | list[int]) -> None:
        """Add counters given in COUNTERS order."""
        self.requests += int(v[0])
        self.prompt_tokens += int(v[1])
        self.cached_prompt_tokens += int(v[2])
        self.cache_write_tokens += int(v[3])
        self.completion_tokens += int(v[4])
        self.reasoning_tokens += int(v[5])
        self.cost_nano += int(v[6])

    def json(self) -> UsageJSON:
        """The wire usage object."""
        return UsageJSON(
            requests=self.requests, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            cache_write_tokens=self.cache_write_tokens,
            completion_tokens=self.completion_tokens, reasoning_tokens=self.reasoning_tokens,
            cost_usd=self.cost_nano / 1e9, cost_nano=self.cost_nano,
        )


def day_num(t: float) -> int:
    """Days since the epoch of the UTC day holding `t`."""
    return int(t // DAY_S)


@functools.lru_cache(maxsize=1024)
def day_str(n: int) -> str:
    """ISO date of epoch day `n` (cached: every record asks, and days are few)."""
    return (_EPOCH + timedelta(days=n)).isoformat()


def month_first_day(n: int) -> int:
    """Epoch day number of the first day of the UTC month holding epoch day `n`."""
    d = _EPOCH + timedelta(days=n)
    return (d.replace(day=1) - _EPOCH).days


def parse_record_id(s: str) -> int:
    """A record id (a positive 63-bit integer, as text); ValueError otherwise."""
    if not s.isascii() or not s.isdigit() or len(s) > 19 or int(s) >= 2**63:
        raise ValueError(f"invalid record id {s[:40]!r}: expected a non-negative integer")
    return int(s)


def record_json(seq: int, rec: UsageRecord) -> dict[str, object]:
    """A record as GET /admin/usage/records returns it (`time` in epoch seconds, UTC)."""
    return {
        "id": str(seq), "time": rec.time, "request_id": rec.request_id, "key": rec.key,
        "user": rec.user, "team": rec.team, "provider": rec.provider, "model": rec.model,
        "status": rec.status, "source": rec.source, "duration_ms": rec.duration_ms,
        "tags": dict(rec.tags),
        "provider_cost_usd": None if rec.provider_cost_nano is None else rec.provider_cost_nano / 1e9,
        **Totals.of(rec).json(),
    }
