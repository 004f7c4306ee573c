"""create_app(config_path): the ASGI application, assembled in one place.

The provider routes are served by the raw ASGI `ProxyRoute` (the hot path); a plain path-dispatch
in front sends only the handful of small endpoints (health, metrics, usage, admin) to Starlette,
whose lifespan owns every long-lived resource: upstream client, store clients, ledger writer,
config reloader.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meterproxy import admin, logs
from meterproxy.auth import is_admin
from meterproxy.config import Config, load_config
from meterproxy.errors import AdminOnly
from meterproxy.forward import ProxyRoute
from meterproxy.labels import ModelLabels
from meterproxy.ledger import Ledger, SchemaTooNew, SchemaTooOld, open_ledger_store
from meterproxy.ledger.export import start_exporters
from meterproxy.limits import Limiter
from meterproxy.limits.catchup import OutageUsage
from meterproxy.limits.memory import MemoryLimiter
from meterproxy.limits.redis import RedisLimiter
from meterproxy.metrics import Metrics, exposition_registry, make_registry, render_latest
from meterproxy.reload import Reloader
from meterproxy.runs import MemoryRuns, RedisRuns, RunRegistry
from meterproxy.state import AppState, StoreHealth
from meterproxy.store import StoreError
from meterproxy.store.redis import make_redis_client
from meterproxy.transport import Client, Proxies

log = logging.getLogger("meterproxy")

# CPython's default gen-0 threshold (700 net allocations) ran a collection every request or two:
# 70-110 µs of CPU per request (10-13 %) and gen-2 pauses up to ~100 ms under load; with these
# thresholds ~2 µs and p99 at c=32 cut 2-4x (bench/, issue #6, docs/performance.md). Cyclic garbage
# is still collected, in batches ~14x larger.
GC_THRESHOLDS = (10_000, 10, 10)

_SMALL = frozenset({"/healthz", "/readyz", "/metrics", "/usage", "/admin/usage",
                    "/admin/usage/records"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: AppState | None = getattr(request.app.state, "mp", None)
    if state is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    ping = getattr(request.app.state, "ping", None)
    if ping is not None:
        try:
            await ping()
        except Exception as exc:  # any store failure means "not ready"
            return JSONResponse({"status": "store unavailable", "error": type(exc).__name__},
                                status_code=503)
    try:
        await state.ledger.ready()
    except Exception as exc:  # the ledger does not accept writes: not ready either
        return JSONResponse({"status": "ledger unavailable", "error": type(exc).__name__},
                            status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.mp
    if state.config.server.metrics_require_admin and not is_admin(state.config, request.headers.raw):
        return admin.error_response(AdminOnly("/metrics requires the admin key."))
    body, ctype = render_latest(request.app.state.registry)
    return Response(body, media_type=ctype)


class MeterProxy:
    """Top-level ASGI app: small endpoints to Starlette, everything else to the proxy route."""

    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.starlette = Starlette(routes=[
            Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
            Route("/usage", admin.usage), Route("/admin/usage", admin.admin_usage),
            Route("/admin/usage/records", admin.admin_records),
        ], lifespan=self._lifespan)
        self.proxy: ProxyRoute | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in _SMALL and self.proxy is not None:
            await self.proxy(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        cfg = self.config
        registry = make_registry()
        m = Metrics(registry)
        # Egress proxies are read from the environment once, here (docs/configuration.md "Environment variables").
        upstream = Client(cfg.server.connect_timeout_s, keepalive_s=30.0, proxies=Proxies.from_env())
        clients: list[Any] = []
        limiter: Limiter
        runs: RunRegistry
        outage: OutageUsage | None = None
        if cfg.store.url:
            # A single node: one WireRedis connection shared by the limiter, runs and readiness
            # (RedisCluster on a cluster). Redis holds limiter state only; the ledger is SQL.
            fast = make_redis_client(cfg.store.url, cfg.store.timeout_ms / 1000)
            clients.append(fast)
            limiter = RedisLimiter(fast, lease_ttl_s=cfg.store.lease_ttl_s)
            runs = RedisRuns(fast)
            app.state.ping = fast.ping
            if cfg.store.on_error == "open":
                outage = OutageUsage(limiter)
                outage.start()
        else:
            limiter = MemoryLimiter(lease_ttl_s=cfg.store.lease_ttl_s)
            runs = MemoryRuns()
            app.state.ping = None
        health = StoreHealth(m)
        ledger = Ledger(open_ledger_store(cfg.ledger_url, cfg.config_dir), on_backlog=m.backlog.set,
                        max_backlog=cfg.store.max_backlog,
                        on_store_error=lambda op: health.failed(op, RuntimeError(op)),
                        on_write=lambda result: m.ledger_writes.labels(result).inc(),
                        retention_days=cfg.ledger.retention_days)
        try:
            version = await ledger.open(auto_migrate=cfg.ledger.migrate == "auto")
        except (SchemaTooOld, SchemaTooNew, StoreError) as exc:
            log.error("ledger %s: %s", ledger.store.url, exc)
            raise
        log.info("ledger %s (schema version %d)", ledger.store.url, version)
        if isinstance(limiter, MemoryLimiter):
            # Budgets survive restarts: this month's usage from the ledger's aggregates.
            try:
                limiter.preload(await ledger.consumption(time.time()))
            except StoreError as exc:
                log.error("budgets not rebuilt from the ledger (%s): they start from zero", exc)
        exporters = start_exporters(cfg, ledger, m)
        state = AppState(config=cfg, upstream=upstream, limiter=limiter, ledger=ledger, runs=runs,
                         metrics=m, labels=ModelLabels(cfg.server.max_model_labels), health=health,
                         outage=outage)
        app.state.mp = state
        app.state.registry = registry
        self.proxy = ProxyRoute(state)
        reloader = Reloader(state, self.config_path) if self.config_path else None
        if reloader is not None:
            reloader.start()
        if cfg.server.metrics_port is not None:
            try:
                # exposition_registry: with --workers N, all workers' values, as on GET /metrics.
                start_http_server(cfg.server.metrics_port, cfg.server.metrics_host,
                                  exposition_registry(registry))
            except OSError as exc:  # with --workers N, one worker holds the port; the view is shared
                log.info("metrics listener not started in pid %d: %s", os.getpid(), exc)
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            yield
        finally:
            if reloader is not None:
                await reloader.stop()
            # uvicorn cancels the requests still running when the grace period ends and then runs
            # this at once; their metering happens as they unwind. Without this wait the ledger
            # drained and closed first, and asyncio.run cancelled that metering: every stream cut
            # at the end of the grace period was missing from the ledger (issue #7).
            pending = [t for t in state.tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=10.0)
            if not await ledger.drain(cfg.server.shutdown_grace_s or 5.0):
                log.error("shutdown: %d usage records could not be written to the store",
                          ledger.backlog)
            for exp in exporters:
                await exp.close()
            await ledger.close(1.0)
            if outage is not None:
                await outage.close()
            await limiter.close()
            await upstream.close()
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.aclose()


def create_app(config_path: str) -> MeterProxy:
    """The application for a config file (validated now; raises ConfigError)."""
    return MeterProxy(load_config(config_path), config_path)


def app_from_env() -> MeterProxy:
    """uvicorn factory for `--workers N`: each worker process reads METERPROXY_CONFIG."""
    app = create_app(os.environ["METERPROXY_CONFIG"])
    logs.setup(app.config.server.log_format)  # workers are fresh processes: as `serve` did
    return app
