"""Process-wide state shared by the ASGI routes: config snapshot, upstream client, store backends,
metrics. Built by app.create_app's lifespan; routes read `state.config` once per request so a reload
never changes the rules under a request in flight."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meterproxy.config import Config
from meterproxy.labels import ModelLabels
from meterproxy.limits import Limiter
from meterproxy.metrics import Metrics
from meterproxy.runs import RunRegistry
from meterproxy.transport import Client

if TYPE_CHECKING:
    from meterproxy.ledger import Ledger
    from meterproxy.limits.catchup import OutageUsage

log = logging.getLogger("meterproxy")


@dataclass
class StoreHealth:
    """Tracks outages so each is logged once (not once per request), and counts every error."""

    metrics: Metrics
    down: bool = False

    def failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.store_errors.labels(operation).inc()
        if not self.down:
            self.down = True
            log.warning("store unavailable (%s: %s); on_error policy applies until it returns",
                        operation, type(exc).__name__)

    def ok(self) -> None:
        if self.down:
            self.down = False
            log.warning("store available again")


@dataclass
class AppState:
    config: Config
    upstream: Client
    limiter: Limiter
    ledger: Ledger
    runs: RunRegistry
    metrics: Metrics
    labels: ModelLabels
    health: StoreHealth
    outage: OutageUsage | None = None   # usage served while Redis was down (on_error: open)
    # Request handlers and settlement retries, which shutdown waits for.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
