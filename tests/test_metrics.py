"""meterproxy.metrics: names/types/labels as in docs/metrics.md, record_usage, buckets, multiprocess."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meterproxy import metrics as metrics_mod
from meterproxy.metrics import Metrics, make_registry, mark_process_dead, render_latest
from tests.dashboard_queries import SPEC_METRICS
from tests.procs import ROOT

_TYPE_RE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)


def _touch_all(m: Metrics) -> None:
    """Create one child of every metric so each exposes samples."""
    m.record_usage(key="k", user="u", provider="p", model="mod", status=200, source="provider",
                   prompt=1, cached_prompt=0, completion=1, reasoning=0, cost_usd=0.1, priced=False)
    m.rate_limited.labels(key="k", user="u", limit="requests").inc()
    m.duration.labels(provider="p", model="mod", stream="false").observe(0.2)
    m.ttft.labels(provider="p", model="mod").observe(0.3)
    m.overhead.observe(0.0002)
    m.upstream_errors.labels(provider="p", kind="timeout").inc()
    m.inflight.labels(provider="p").inc()
    m.store_errors.labels(operation="admit").inc()
    m.backlog.set(4)
    m.config_reloads.labels(result="ok").inc()
    m.ledger_writes.labels(result="ok").inc()
    m.export_pending.labels(exporter="cloudevents").set(3)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out


@pytest.fixture()
def reg() -> CollectorRegistry:
    return make_registry()


@pytest.fixture()
def m(reg: CollectorRegistry) -> Metrics:
    return Metrics(reg)


def test_exposed_names_and_types_are_exactly_the_spec(reg: CollectorRegistry, m: Metrics) -> None:
    _touch_all(m)
    text = generate_latest(reg).decode()
    declared = {name: typ for name, typ in _TYPE_RE.findall(text) if name.startswith("meterproxy_")}
    # The 0.0.4 text format declares counters under their exposed `_total` name.
    assert declared == {name: typ for name, (typ, _) in SPEC_METRICS.items()}


def test_every_sample_name_and_label_set_is_the_spec(reg: CollectorRegistry, m: Metrics) -> None:
    _touch_all(m)
    seen: set[str] = set()
    for name, labels, _ in _samples(generate_latest(reg).decode()):
        if not name.startswith("meterproxy_"):
            continue
        base = name
        if name not in SPEC_METRICS:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert SPEC_METRICS[base][0] == "histogram", name
        if name.endswith("_bucket"):
            del labels["le"]
        assert set(labels) == set(SPEC_METRICS[base][1]), (name, labels)
        seen.add(base)
    assert seen == set(SPEC_METRICS)


def test_no_created_series(reg: CollectorRegistry, m: Metrics) -> None:
    _touch_all(m)
    assert "_created" not in generate_latest(reg).decode()


def test_record_usage_adds_every_series(reg: CollectorRegistry, m: Metrics) -> None:
    base = {"key": "k1", "user": "alice", "provider": "openai", "model": "gpt-5.4"}
    for _ in range(2):
        m.record_usage(**base, status=200, source="provider", prompt=100, cached_prompt=40,
                       completion=30, reasoning=10, cost_usd=0.25, priced=True)
    m.record_usage(**base, status=500, source="estimated", prompt=7, cached_prompt=0,
                   completion=0, reasoning=0, cost_usd=0.0, priced=False)

    def v(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, labels)

    assert v("meterproxy_requests_total", **base, status="200") == 2
    assert v("meterproxy_requests_total", **base, status="500") == 1
    want_tokens = {"prompt": 200, "cached_prompt": 80, "completion": 60, "reasoning": 20}
    for typ, want in want_tokens.items():
        assert v("meterproxy_tokens_total", **base, type=typ, source="provider") == want, typ
    # Zero-valued types still exist so dashboards see every type.
    assert v("meterproxy_tokens_total", **base, type="prompt", source="estimated") == 7
    for typ in ("cached_prompt", "completion", "reasoning"):
        assert v("meterproxy_tokens_total", **base, type=typ, source="estimated") == 0, typ
    assert v("meterproxy_cost_usd_total", **base) == pytest.approx(0.5)
    assert v("meterproxy_unpriced_requests_total", model="gpt-5.4") == 1


def test_record_usage_priced_does_not_count_unpriced(reg: CollectorRegistry, m: Metrics) -> None:
    m.record_usage(key="k", user="u", provider="p", model="x", status=200, source="provider",
                   prompt=1, cached_prompt=0, completion=1, reasoning=0, cost_usd=0.1, priced=True)
    assert reg.get_sample_value("meterproxy_unpriced_requests_total", {"model": "x"}) is None


def test_record_usage_rejects_negative_cost(m: Metrics) -> None:
    with pytest.raises(ValueError):
        m.record_usage(key="k", user="u", provider="p", model="x", status=200, source="provider",
                       prompt=0, cached_prompt=0, completion=0, reasoning=0, cost_usd=-1.0,
                       priced=True)


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [
        ("meterproxy_request_duration_seconds", 0.005, 600.0),
        ("meterproxy_time_to_first_token_seconds", 0.05, 60.0),
        ("meterproxy_overhead_seconds", 0.00005, 0.05),
    ],
)
def test_histogram_bucket_ranges(
    reg: CollectorRegistry, m: Metrics, name: str, lo: float, hi: float,
) -> None:
    _touch_all(m)
    les = [float(lab["le"]) for n, lab, _ in _samples(generate_latest(reg).decode())
           if n == name + "_bucket"]
    assert les[-1] == math.inf
    finite = les[:-1]
    assert finite == sorted(finite)
    assert finite[0] == pytest.approx(lo)
    assert finite[-1] == pytest.approx(hi)
    assert len(finite) >= 8  # enough resolution for p50/p95/p99 across the range


def test_render_latest_single_process(
    reg: CollectorRegistry, m: Metrics, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    _touch_all(m)
    body, ctype = render_latest(reg)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert b"meterproxy_usage_backlog 4.0" in body


_WORKER = textwrap.dedent("""
    import os, sys
    from meterproxy.metrics import Metrics, make_registry
    n = int(sys.argv[1])
    m = Metrics(make_registry())
    m.record_usage(key="k1", user="u1", provider="p", model="m", status=200, source="provider",
                   prompt=10 * n, cached_prompt=n, completion=5 * n, reasoning=2 * n,
                   cost_usd=0.5 * n, priced=False)
    m.duration.labels(provider="p", model="m", stream="true").observe(0.1 * n)
    m.overhead.observe(0.001 * n)
    m.inflight.labels(provider="p").inc(n)
    m.backlog.inc(n)
    print(os.getpid())
""")

_RENDER = textwrap.dedent("""
    import sys
    from meterproxy.metrics import make_registry, render_latest
    body, ctype = render_latest(make_registry())
    sys.stdout.write(body.decode())
""")


def _run(code: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_multiprocess_aggregates_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pid1 = int(_run(_WORKER, env, "1"))
    int(_run(_WORKER, env, "2"))
    assert any(p.name.endswith(f"_{pid1}.db") for p in tmp_path.iterdir())

    def values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(n, frozenset(lab.items())): val for n, lab, val in _samples(text)}

    def get(vals: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
            **labels: str) -> float:
        return vals[(name, frozenset(labels.items()))]

    base = {"key": "k1", "user": "u1", "provider": "p", "model": "m"}
    vals = values(_run(_RENDER, env))
    assert get(vals, "meterproxy_requests_total", **base, status="200") == 2
    assert get(vals, "meterproxy_tokens_total", **base, type="prompt", source="provider") == 30
    assert get(vals, "meterproxy_tokens_total", **base, type="reasoning", source="provider") == 6
    assert get(vals, "meterproxy_cost_usd_total", **base) == pytest.approx(1.5)
    assert get(vals, "meterproxy_unpriced_requests_total", model="m") == 2
    dur = {"provider": "p", "model": "m", "stream": "true"}
    assert get(vals, "meterproxy_request_duration_seconds_count", **dur) == 2
    assert get(vals, "meterproxy_request_duration_seconds_sum", **dur) == pytest.approx(0.3)
    assert get(vals, "meterproxy_request_duration_seconds_bucket", **dur, le="0.1") == 1
    assert get(vals, "meterproxy_request_duration_seconds_bucket", **dur, le="0.25") == 2
    assert get(vals, "meterproxy_overhead_seconds_count") == 2
    assert get(vals, "meterproxy_overhead_seconds_sum") == pytest.approx(0.003)
    assert get(vals, "meterproxy_inflight_requests", provider="p") == 3
    assert get(vals, "meterproxy_usage_backlog") == 3

    # A dead worker's live gauges drop out; its counters stay so totals never go backwards.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    mark_process_dead(pid1)
    vals = values(_run(_RENDER, env))
    assert get(vals, "meterproxy_inflight_requests", provider="p") == 2
    assert get(vals, "meterproxy_usage_backlog") == 2
    assert get(vals, "meterproxy_requests_total", **base, status="200") == 2


def test_mark_process_dead_without_multiproc_dir_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert metrics_mod.multiprocess_dir() is None
    mark_process_dead(os.getpid())  # must not raise (prometheus_client would glob None)
