"""Usage served while the limiter store was down (store.on_error: open), charged when it is back.

Failing open admits requests without reserving anything, so without this a Redis outage was free:
what was used meanwhile never reached the budget counters. `add` (after the response, O(1)) sums
the usage per (user, key, UTC day) in memory — bounded by `max_entries` cells, beyond which new
cells are dropped and counted (the ledger still has every record); a background loop charges
each cell once the store answers, through `Limiter.charge` with an id per cell, so a charge that
timed out after committing is not applied twice when retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from meterproxy.ledger.record import day_num
from meterproxy.limits import Limiter
from meterproxy.store import StoreError

log = logging.getLogger("meterproxy.limits")


class OutageUsage:
    """Pending budget charges (see the module docstring)."""

    def __init__(self, limiter: Limiter, max_entries: int = 100_000, every_s: float = 1.0) -> None:
        self._limiter = limiter
        self._max = max_entries
        self._every = every_s
        self._pending: dict[tuple[str, str, int], list[int]] = {}   # (user, key, day) -> [tok, cost]
        self._retry: list[tuple[str, str, int, int, int, str]] = []  # charges with their ids
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending) + len(self._retry)

    def add(self, key_id: str, user: str, tokens: int, cost_nano: int, t: float) -> None:
        """Remember usage served without admission."""
        k = (user, key_id, day_num(t))
        e = self._pending.get(k)
        if e is not None:
            e[0] += tokens
            e[1] += cost_nano
        elif len(self._pending) < self._max:
            self._pending[k] = [tokens, cost_nano]
        else:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("outage usage over %d cells: %d not charged to budgets", self._max,
                          self.dropped)

    async def flush(self) -> bool:
        """Charge everything pending; True when nothing is left (False: the store still fails)."""
        self._retry += [(u, k, d, t, c, uuid.uuid4().hex) for (u, k, d), (t, c) in self._pending.items()]
        self._pending.clear()
        while self._retry:
            user, key_id, day, tokens, cost, cid = self._retry[0]
            try:
                await self._limiter.charge(key_id, user, tokens, cost, day, cid)
            except StoreError:
                return False
            self._retry.pop(0)
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outage-usage")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            if len(self):
                n = len(self)
                if await self.flush():
                    log.warning("store back: usage of %d (user, key, day) cells served during the "
                                "outage charged to budgets", n)

    async def close(self) -> None:
        """Stop the loop after one last attempt."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if len(self):
            with contextlib.suppress(Exception):
                await self.flush()
