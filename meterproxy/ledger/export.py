"""Exporters: push every ledger record, at least once and in record order, to another system.

`cloudevents`: batches of CloudEvents 1.0 JSON (`application/cloudevents-batch+json`, the
OpenMeter ingest format), `type` com.meterproxy.usage, `id` = record id, `subject` = user,
`time`, `data` = the record as /admin/usage/records shows it. Each exporter reads records after
its cursor (kept in the ledger, so a restart resumes where it stopped), POSTs them, and moves the
cursor only after a 2xx: a crash between the two resends the batch (at least once; receivers
de-duplicate by `id`). Failures are retried with backoff (0.5 s doubling to 30 s). Cursors only
move forward. One process exports at a time (a PostgreSQL session advisory lock across the fleet,
a lock file beside a SQLite ledger across --workers N); when its holder dies another takes over
from the cursor, so at worst the last unacknowledged batch is sent twice, never a record skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from meterproxy.ledger.record import UsageRecord, record_json

if TYPE_CHECKING:
    from meterproxy.config import Config, ExportConfig
    from meterproxy.ledger import Ledger
    from meterproxy.metrics import Metrics

log = logging.getLogger("meterproxy.export")
CONTENT_TYPE = "application/cloudevents-batch+json"
EVENT_TYPE = "com.meterproxy.usage"
IDLE_S = 0.5
LEASE_RETRY_S = 2.0
BACKOFF_MAX_S = 30.0


def cloudevent(rid: int, rec: UsageRecord) -> dict[str, Any]:
    """One record as a CloudEvents 1.0 event."""
    return {
        "specversion": "1.0", "type": EVENT_TYPE, "source": "meterproxy", "id": str(rid),
        "subject": rec.user, "time": datetime.fromtimestamp(rec.time, UTC).isoformat(),
        "datacontenttype": "application/json", "data": record_json(rid, rec),
    }


class CloudEventsExporter:
    """One configured `cloudevents` exporter (see the module docstring)."""

    def __init__(self, name: str, cfg: ExportConfig, ledger: Ledger,
                 on_pending: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._cfg = cfg
        self._ledger = ledger
        self._on_pending = on_pending
        self._task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=30.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"export-{self.name}")

    async def _run(self) -> None:
        store = self._ledger.store
        cursor: int | None = None
        delay = 0.5
        while True:
            try:
                if not await store.exporter_lease(self.name):
                    cursor = None   # another process exports; re-read the cursor if we take over
                    await asyncio.sleep(LEASE_RETRY_S)
                    continue
                if cursor is None:
                    cursor = await store.cursor(self.name)
                page = await store.records(cursor, self._cfg.batch_size)
                if self._on_pending is not None:
                    self._on_pending(max(await store.last_id() - cursor, 0))
                if not page:
                    await asyncio.sleep(IDLE_S)
                    continue
                body = orjson.dumps([cloudevent(i, r) for i, r in page])
                r = await self._http.post(self._cfg.url, content=body,
                                          headers={**self._cfg.headers, "content-type": CONTENT_TYPE})
                if r.status_code >= 300:
                    raise RuntimeError(f"HTTP {r.status_code}")
                cursor = page[-1][0]
                await store.set_cursor(self.name, cursor)
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # the receiver or the ledger failed: back off, resend
                log.warning("exporter %s: %s; retrying in %.1f s", self.name, exc, delay)
                cursor = None   # re-read: the cursor in the ledger is the truth
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._http.aclose()


def start_exporters(cfg: Config, ledger: Ledger, metrics: Metrics) -> list[CloudEventsExporter]:
    """Start every exporter of `ledger.export`."""
    out = []
    for e in cfg.ledger.export:
        name = e.name or e.type
        exp = CloudEventsExporter(name, e, ledger, on_pending=metrics.export_pending.labels(name).set)
        exp.start()
        out.append(exp)
    if out:
        log.info("exporters started: %s (pid %d)", ", ".join(x.name for x in out), os.getpid())
    return out
