"""Limiter contract: admission of one request against every limit of its key and user, at once.

Two backends share these semantics exactly (one contract test suite runs over both):
`memory.MemoryLimiter` (single process, the default) and `redis.RedisLimiter` (any number of
processes on one Redis; one round trip per admission).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from meterproxy.store import StoreError

__all__ = ["LIMIT_NAMES", "Admission", "Decision", "Limiter", "Limits", "RateSnapshot", "StoreError"]

LIMIT_NAMES = (
    "requests", "tokens", "concurrency",
    "daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd",
)


@dataclass(frozen=True, slots=True)
class Limits:
    """One principal's limits; None means unlimited. USD budgets are in nano-USD (1e-9 USD)."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_usd_nano: int | None = None
    monthly_usd_nano: int | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """What one request asks of the limiter."""

    request_id: str          # unique per request; names the reservation and the concurrency lease
    key_id: str
    user: str
    key_limits: Limits
    user_limits: Limits
    tokens: int              # reserved token estimate (prompt estimate + max completion)
    cost_nano: int           # reserved cost estimate in nano-USD (for USD budgets)


@dataclass(frozen=True, slots=True)
class RateSnapshot:
    """The key's own request/token buckets after the decision, for x-ratelimit-* headers."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float = 0.0     # seconds until the request bucket is full again
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of an admission. When denied, nothing was charged (all or nothing)."""

    allowed: bool
    limit: str | None = None          # one of LIMIT_NAMES when denied
    retry_after_s: float | None = None  # when the same request would pass; None for budgets/too large
    too_large: bool = False           # the estimate exceeds a bucket's capacity: can never pass
    snapshot: RateSnapshot = field(default_factory=RateSnapshot)


class Limiter(Protocol):
    """Admission, settlement and status. Every method may raise StoreError (never hangs)."""

    async def admit(self, adm: Admission) -> Decision:
        """Check every limit of key and user; if all pass, charge rpm 1, reserve tokens/cost
        against tpm and budgets, take a concurrency lease. All or nothing."""
        ...

    async def settle(self, adm: Admission, tokens: int, cost_nano: int) -> None:
        """Replace the reservation of `adm` by the real usage (refund or charge the difference,
        refunds capped at capacity, debt allowed) and release its concurrency lease.
        Idempotent: a second call, or one after the reservation expired, changes nothing."""
        ...

    async def status(self, key_id: str, user: str, key_limits: Limits,
                     user_limits: Limits) -> dict[str, dict[str, float | int | None]]:
        """For GET /usage: {limit_name: {"limit", "remaining", "reset_s"}} for the key's limits."""
        ...

    async def charge(self, key_id: str, user: str, tokens: int, cost_nano: int, day: int,
                     charge_id: str) -> None:
        """Add usage of epoch day `day` to the key's and user's day/month budget counters
        without checks, once per `charge_id` (usage served while the store was down)."""
        ...

    async def close(self) -> None: ...
