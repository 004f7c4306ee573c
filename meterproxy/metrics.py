"""Every Prometheus metric of docs/metrics.md, defined in one place on an injected registry.

The names, types and labels below are part of the product contract; the dashboard
(`dashboards/meterproxy.json`) and the alerts (`deploy/alerts.yml`) query them by name.

Multiprocess (`serve --workers N`): prometheus_client chooses where values live when it is
*imported* — with `PROMETHEUS_MULTIPROC_DIR` set, every metric writes to per-pid mmap files in
that directory, whatever registry it is registered on. `render_latest` then aggregates the
files of all workers; the supervisor calls `mark_process_dead` for a worker that exits so its
live gauges (`inflight`, `backlog`) stop counting.

Cardinality: `key`, `user` and `provider` come from the config and are bounded by it; `model`
comes from requests, so the caller must bound it (e.g. map unknown models to one value) before
passing it here — every distinct label set is a time series and a cached child in this module.
"""

from __future__ import annotations

import os
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _mp
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "DURATION_BUCKETS",
    "OVERHEAD_BUCKETS",
    "TOKEN_TYPES",
    "TTFT_BUCKETS",
    "Metrics",
    "exposition_registry",
    "make_registry",
    "mark_process_dead",
    "multiprocess_dir",
    "render_latest",
]

#: Whole request, 5 ms … 10 min: a cached embedding is milliseconds, a long reasoning stream
#: can run for minutes (the default upstream timeout is 600 s).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)
#: Time to first token, 50 ms … 60 s: reasoning models may think for a long time first.
TTFT_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)
#: Proxy overhead (upstream excluded), 50 µs … 50 ms: the budget is sub-millisecond, so
#: resolution is spent at the low end.
OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
)
#: Values of the `type` label of `meterproxy_tokens_total`, in the order of docs/metrics.md.
# cached_prompt and cache_write are parts of prompt, reasoning a part of completion: never add them up.
TOKEN_TYPES: tuple[str, ...] = ("prompt", "cached_prompt", "completion", "reasoning", "cache_write")

_USAGE_LABELS = ("key", "user", "provider", "model")
_M = TypeVar("_M", bound=MetricWrapperBase)


def multiprocess_dir() -> str | None:
    """The multiprocess metrics directory from the environment, or None in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metrics of docs/metrics.md, registered on `registry`.

    Use the attributes directly for the simple ones (`m.rate_limited.labels(key=..., user=...,
    limit="requests").inc()`); use `record_usage` once per finished response.
    Label values: `status` is the HTTP status as a string, `type` one of `TOKEN_TYPES`,
    `source` `provider`|`estimated`, `result` `ok`|`error`; the caller bounds `model`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        # `_created` series would double the exposition of every labelled counter and are
        # absent in multiprocess mode anyway; turning them off keeps /metrics to exactly the
        # documented names in both modes. The switch is process-global in prometheus_client.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
        r = registry
        # prometheus_client appends `_total` to counter names; passing the base name keeps the
        # exposed name exactly the documented one (`meterproxy_requests` -> `meterproxy_requests_total`).
        self.requests = Counter(
            "meterproxy_requests", "Proxied requests by final HTTP status.",
            [*_USAGE_LABELS, "status"], registry=r,
        )
        self.tokens = Counter(
            "meterproxy_tokens", "Tokens metered, by type (cached_prompt is part of prompt, "
            "reasoning part of completion) and source (provider usage or estimated).",
            [*_USAGE_LABELS, "type", "source"], registry=r,
        )
        self.cost = Counter(
            "meterproxy_cost_usd", "Cost of metered usage in USD.", list(_USAGE_LABELS), registry=r,
        )
        self.rate_limited = Counter(
            "meterproxy_rate_limited", "Requests rejected by a limit or budget.",
            ["key", "user", "limit"], registry=r,
        )
        self.duration = Histogram(
            "meterproxy_request_duration_seconds",
            "Whole request duration, until the last byte reached the client.",
            ["provider", "model", "stream"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "meterproxy_time_to_first_token_seconds",
            "Time from request to the first streamed content byte.",
            ["provider", "model"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "meterproxy_overhead_seconds", "Time spent in the proxy itself, upstream excluded.",
            buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "meterproxy_upstream_errors", "Failures reaching or reading from a provider.",
            ["provider", "kind"], registry=r,
        )
        # livesum: in-flight counts of a dead worker must not linger in the total.
        self.inflight = Gauge(
            "meterproxy_inflight_requests", "Requests currently being proxied.",
            ["provider"], multiprocess_mode="livesum", registry=r,
        )
        self.store_errors = Counter(
            "meterproxy_store_errors", "Limiter store and ledger database operations that failed.",
            ["operation"], registry=r,
        )
        self.backlog = Gauge(
            "meterproxy_usage_backlog", "Usage records waiting for the ledger database.",
            multiprocess_mode="livesum", registry=r,
        )
        self.unpriced = Counter(
            "meterproxy_unpriced_requests", "Metered requests whose model has no price (cost 0).",
            ["model"], registry=r,
        )
        self.ledger_writes = Counter(
            "meterproxy_ledger_writes", "Ledger batch writes by result (ok, error: retried).",
            ["result"], registry=r,
        )
        # livemax: every worker exports from the same cursor; the largest figure is the truth.
        self.export_pending = Gauge(
            "meterproxy_export_pending", "Ledger records an exporter has not delivered yet.",
            ["exporter"], multiprocess_mode="livemax", registry=r,
        )
        self.config_reloads = Counter(
            "meterproxy_config_reloads", "Config reload attempts by result.",
            ["result"], registry=r,
        )
        # Children cached per label tuple: `.labels()` validates and locks on every call, and
        # record_usage runs once per request. Plain dicts: a racing double insert just stores
        # the same child twice (labels() returns the one child per label set).
        self._usage_children: dict[
            tuple[str, str, str, str, str, str],
            tuple[Counter, tuple[Counter, Counter, Counter, Counter, Counter], Counter],
        ] = {}
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}

    def child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, cached: the per-request metrics (inflight, duration, ttft)
        skip labels()'s validation and lock. Label values must be bounded, as for labels()."""
        k = (metric, values)
        c = self._children.get(k)
        if c is None:
            c = self._children[k] = metric.labels(*values)
        return c  # type: ignore[return-value]  # labels() returns the metric's own type

    def record_usage(
        self, *, key: str, user: str, provider: str, model: str, status: int, source: str,
        prompt: int, cached_prompt: int, completion: int, reasoning: int, cost_usd: float,
        priced: bool, cache_write: int = 0,
    ) -> None:
        """Count one finished response: requests +1, the five token types, cost, unpriced.

        All five `type` series are touched even when 0, so dashboards see every type from the
        first request on. `cost_usd` must be >= 0; `priced=False` also counts the request in
        `meterproxy_unpriced_requests_total{model}`.
        """
        status_s = str(status)
        ck = (key, user, provider, model, status_s, source)
        children = self._usage_children.get(ck)
        if children is None:
            children = self._usage_children[ck] = self._make_children(ck)
        req, (t_prompt, t_cached, t_completion, t_reasoning, t_write), cost = children
        req.inc()
        t_prompt.inc(prompt)
        t_cached.inc(cached_prompt)
        t_completion.inc(completion)
        t_reasoning.inc(reasoning)
        t_write.inc(cache_write)
        cost.inc(cost_usd)
        if not priced:
            self.child(self.unpriced, model).inc()

    def _make_children(
        self, ck: tuple[str, str, str, str, str, str],
    ) -> tuple[Counter, tuple[Counter, Counter, Counter, Counter, Counter], Counter]:
        """Labelled children for one (key, user, provider, model, status, source)."""
        key, user, provider, model, status_s, source = ck
        base = {"key": key, "user": user, "provider": provider, "model": model}
        t = [self.tokens.labels(**base, type=typ, source=source) for typ in TOKEN_TYPES]
        return (
            self.requests.labels(**base, status=status_s),
            (t[0], t[1], t[2], t[3], t[4]),
            self.cost.labels(**base),
        )


def make_registry() -> CollectorRegistry:
    """A fresh registry for one `Metrics`.

    In multiprocess mode metrics are still defined on it (so `Metrics` is the same code in both
    modes), but their values go to the mmap files and `render_latest` reads those instead.
    """
    return CollectorRegistry()


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The registry to expose for `registry`: itself, or with `PROMETHEUS_MULTIPROC_DIR` set a
    fresh registry whose `MultiProcessCollector` merges the files of every worker (live and dead)
    at each collection — `registry` itself then yields only this worker's values.

    Used by `render_latest` and for the separate `server.metrics_port` listener: that listener was
    given `registry` directly, so with `--workers N` it exposed the one worker holding the port
    (found by tests/e2e/test_monitoring.py: 20 of 48 requests with 2 workers).
    """
    path = multiprocess_dir()
    if path is None:
        return registry
    merged = CollectorRegistry()
    _mp.MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
    return merged


def render_latest(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Body and Content-Type for `GET /metrics`: `exposition_registry(registry)` in the classic
    text format, so the 0.0.4 content type is declared (understood by every Prometheus version).
    """
    return generate_latest(exposition_registry(registry)), CONTENT_TYPE_PLAIN_0_0_4


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of worker `pid` (call when it exits); no-op in single-process mode.

    Counters and histograms of the dead worker stay, so totals never go backwards.
    """
    path = multiprocess_dir()
    if path is not None:
        _mp.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
