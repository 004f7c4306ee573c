"""Issue #5 end to end: a real Prometheus scrapes a real proxy that served a mixed workload through the
simulator; every PromQL expression of dashboards/meterproxy.json must return data, the alert rules
must evaluate against the exported metrics, and the metric values must equal the usage ledger —
with one worker and with `--workers 2`.

Workload (module fixture `monitored`, one proxy with a Redis store, one worker), run twice so every
counter increases inside the 1 m `$__rate_interval` window (rates and quantiles are then finite):
streams and non-streams through the openai SDK, a tool call, cached prompt tokens, an unpriced
reasoning model (o3-mini), a provider 500, an unreachable provider (`dead`, a closed port), a stream
the provider breaks (upstream error + estimated usage), usage omitted by the provider (estimated),
429s for three limit types (`requests` via rpm, `tokens` via a request larger than tpm,
`concurrency` via a burst), a config reload (SIGHUP), and — between the rounds — an outage of
Redis (killed, restarted from its AOF) and of the PostgreSQL ledger (stopped, restarted), so store
errors and a usage backlog exist; on_error is open, so the proxy serves on and the backlog drains
into the ledger when PostgreSQL is back.

Requests vs ledger, like with like: the ledger records every *forwarded* request (whatever the
provider answered, 5xx and unreachable included); requests the proxy rejects itself (here only
429s) are counted in `meterproxy_requests_total` (model="none") and `meterproxy_rate_limited_total`
but never reach the ledger. So forwarded = requests_total{model!="none"} = ledger requests, and
rejected = requests_total{model="none"} = rate_limited_total = the 429s the clients saw.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard_queries import dashboard_exprs, substitute
from tests.e2e.cluster import ADMIN_KEY, KEYS, bearer, make_config, proxy, write_config
from tests.procs import ROOT, PostgresServer, Proc, RedisServer, free_port, simulator, wait_port

DASHBOARD = ROOT / "dashboards" / "meterproxy.json"
ALERTS = ROOT / "deploy" / "alerts.yml"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about rivers and stones."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]
TOKEN_FIELDS = {"prompt": "prompt_tokens", "cached_prompt": "cached_prompt_tokens",
                "completion": "completion_tokens", "reasoning": "reasoning_tokens"}

#: Template-variable selections the dashboard is evaluated under. `.*` alone cannot catch a filter on
#: a label the metric lacks (`.*` matches the empty string), so real values are needed too: the last
#: set pins all four variables to a slice of the workload that has every panel's data (bob-1's
#: o3-mini traffic on provider `sim`: unpriced, streamed, broken, rejected as too large).
SELECTIONS: list[dict[str, str]] = [
    {},
    {"user": "alice"},
    {"user": "bob", "key": "bob-1", "provider": "sim", "model": "o3-mini"},
]


# --- a real Prometheus ----------------------------------------------------------------------------

class Prometheus:
    """`prometheus` on a free loopback port, own TSDB dir, scraping `target` every second (with the
    bearer token `token`, if any) and evaluating deploy/alerts.yml every second."""

    def __init__(self, target: str, token: str | None = None) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus not installed: run `make test`, which installs it")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mp-prom-"))
        job: dict[str, Any] = {"job_name": "meterproxy", "metrics_path": "/metrics",
                               "static_configs": [{"targets": [target]}]}
        if token is not None:
            job["authorization"] = {"type": "Bearer", "credentials": token}
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [job],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=str(self.dir))
        wait_port(self.port, 30, self.proc)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: httpx.get(f"{self.base}/-/ready").status_code == 200, 30, "prometheus ready")

    def query(self, expr: str) -> dict[str, Any]:
        """The raw /api/v1/query answer for an instant query at now."""
        r = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = r.json()
        return body

    def vector(self, expr: str) -> list[dict[str, Any]]:
        ans = self.query(expr)
        assert ans["status"] == "success", (expr, ans)
        result: list[dict[str, Any]] = ans["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The value of a one-series result, None when there is no series."""
        res = self.vector(expr)
        return float(res[0]["value"][1]) if res else None

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(every)


# --- the proxy's /metrics and ledger --------------------------------------------------------------

Samples = list[tuple[str, dict[str, str], float]]


def scrape(base: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of GET /metrics (a fresh connection each time)."""
    r = httpx.get(f"{base}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return [(s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def total(samples: Samples, name: str, **match: str | Callable[[str], bool]) -> float:
    """Sum of `name`'s samples whose labels match (a value, or a predicate on the value)."""
    out = 0.0
    for n, labels, value in samples:
        if n != name:
            continue
        if all(m(labels.get(k, "")) if callable(m) else labels.get(k) == m for k, m in match.items()):
            out += value
    return out


def ledger_total(base: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/admin/usage", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    t: dict[str, Any] = r.json()["total"]
    return t


def assert_metrics_equal_ledger(samples: Samples, ledger: dict[str, Any], tally: Tally) -> None:
    """SPEC: tokens by type, cost and forwarded requests in /metrics equal the ledger's totals."""
    for typ, fld in TOKEN_FIELDS.items():
        assert total(samples, "meterproxy_tokens_total", type=typ) == ledger[fld], typ
    assert ledger["prompt_tokens"] > 0 and ledger["completion_tokens"] > 0
    assert total(samples, "meterproxy_cost_usd_total") == pytest.approx(ledger["cost_nano"] / 1e9, rel=1e-9)
    assert ledger["cost_nano"] > 0
    forwarded = total(samples, "meterproxy_requests_total", model=lambda m: m != "none")
    assert forwarded == ledger["requests"] == tally.forwarded
    rejected = total(samples, "meterproxy_requests_total", model="none")
    assert rejected == total(samples, "meterproxy_rate_limited_total") == tally.rejected


# --- workload -------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the clients saw; a 429 can only come from the proxy here (no x-sim-status 429 is sent)."""

    statuses: Counter[int] = field(default_factory=Counter)
    streams: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, stream: bool = False) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.streams += stream

    @property
    def rejected(self) -> int:
        return self.statuses[429]

    @property
    def forwarded(self) -> int:
        return sum(self.statuses.values()) - self.rejected


def _sdk(base: str, key_id: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[key_id][1], max_retries=0,
                         default_headers=headers or None, timeout=30)


def _stream_sdk(client: openai.OpenAI, tally: Tally, **kw: Any) -> str:
    text = ""
    for chunk in client.chat.completions.create(messages=MSG, stream=True, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                text += (tc.function.arguments or "") if tc.function else ""
    tally.add(200, stream=True)
    return text


def _post(base: str, key_id: str, tally: Tally, body: dict[str, Any], path: str = "/v1/chat/completions",
          **headers: str) -> int:
    """POST with a fresh connection; reads streams to the end. Returns the status."""
    with httpx.stream("POST", f"{base}{path}", json=body, headers={**bearer(key_id), **headers},
                      timeout=30) as r:
        try:
            r.read()
        except httpx.RemoteProtocolError:
            # The provider broke the stream, so the proxy cut the client's connection too.
            assert "x-sim-break-after" in headers
    tally.add(r.status_code, stream=r.status_code == 200 and body.get("stream") is True)
    return r.status_code


def round_of_traffic(base: str, tally: Tally) -> None:
    """One round of the mixed workload (see the module docstring); the concurrency burst is last."""
    alice = _sdk(base, "alice-1")
    r = _sdk(base, "alice-1", **{"x-sim-cached-tokens": "4"}).chat.completions.create(
        model="gpt-5.4", messages=MSG)
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    tally.add(200)
    assert _stream_sdk(alice, tally, model="gpt-5.4")
    assert json.loads(_stream_sdk(alice, tally, model="gpt-5.4", tools=TOOLS))
    alice.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    tally.add(200)
    assert _post(base, "alice-1", tally, {"model": "gpt-5.4", "messages": MSG}, **{"x-sim-status": "500"}) == 500
    assert _post(base, "alice-1", tally, {"model": "gpt-5.4", "messages": MSG}, path="/dead/v1/chat/completions") == 502
    omit = {"x-sim-omit-usage": "1"}
    assert _post(base, "alice-1", tally, {"model": "gpt-5.4", "messages": MSG, "stream": True}, **omit) == 200
    _sdk(base, "alice-1", **omit).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    tally.add(200)
    # alice-2: rpm 3, so at least the 4th request of the first round is refused (limit=requests).
    for _ in range(4):
        _post(base, "alice-2", tally, {"model": "gpt-4o-mini", "messages": MSG})
    bob = _sdk(base, "bob-1")
    r = bob.chat.completions.create(model="o3-mini", messages=MSG, reasoning_effort="low")
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens
    tally.add(200)
    assert _stream_sdk(bob, tally, model="o3-mini")
    # The provider breaks the stream: an upstream error on `sim`, usage estimated.
    assert _post(base, "bob-1", tally, {"model": "o3-mini", "messages": MSG, "stream": True},
                 **{"x-sim-break-after": "3"}) == 200
    # Larger than bob-1's tpm: refused at once (limit=tokens).
    assert _post(base, "bob-1", tally, {"model": "o3-mini", "messages": MSG, "max_tokens": 10**6}) == 429
    # alice-1: concurrency 2, five slow streams at once (limit=concurrency).
    slow = {"x-sim-chunk-delay-ms": "100", "x-sim-chunks": "5"}
    body = {"model": "gpt-5.4", "messages": MSG, "stream": True}
    with ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(lambda _: _post(base, "alice-1", tally, body, **slow), range(5)))
    assert 429 in codes and 200 in codes, codes


# --- the monitored stack (one worker, Redis store) ------------------------------------------------

@dataclass
class Monitored:
    sim: Proc
    px: Proc
    prom: Prometheus
    tally: Tally


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    tmp = tmp_path_factory.mktemp("monitoring")
    # AOF with fsync on every write: the ledger survives the outage below (kill -9, restart).
    redis = RedisServer(extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    pg = PostgresServer().start()
    prom: Prometheus | None = None
    try:
        with simulator() as sim:
            # /metrics needs the admin key on the main listener; Prometheus scrapes with it.
            cfg = make_config(
                sim.port, store_url=redis.url, on_error="open", server={"metrics_require_admin": True},
                ledger={"url": pg.new_database()},
                keys={"alice-1": {"limits": {"concurrency": 2}}, "alice-2": {"limits": {"rpm": 3}},
                      "bob-1": {"limits": {"tpm": 50_000}}})
            # A provider nobody listens on: every request to it is an "unreachable" upstream error.
            cfg["providers"]["dead"] = {"base_url": f"http://127.0.0.1:{free_port()}", "paths": ["/dead/"]}
            path = write_config(tmp / "config.yaml", cfg)
            with proxy(path) as px:
                prom = Prometheus(f"127.0.0.1:{px.port}", token=ADMIN_KEY)
                tally = Tally()
                run_workload(px, prom, redis, pg, tally)
                yield Monitored(sim, px, prom, tally)
    finally:
        if prom is not None:
            prom.stop()
        redis.cleanup()
        pg.cleanup()


def run_workload(px: Proc, prom: Prometheus, redis: RedisServer, pg: PostgresServer, tally: Tally) -> None:
    base = px.base
    round_of_traffic(base, tally)
    px.signal(signal.SIGHUP)  # a config reload (same file): meterproxy_config_reloads_total{result="ok"}
    # Let Prometheus see round one, so round two's increments fall between two samples.
    wait_for(lambda: prom.scalar('sum(meterproxy_unpriced_requests_total{model="o3-mini"})') == 3, 15,
             "round one scraped")

    # Store outage: requests are served (on_error open) while admissions and ledger writes fail.
    redis.stop()
    pg.stop("immediate")
    bob = _sdk(base, "bob-1")
    for _ in range(2):
        bob.chat.completions.create(model="o3-mini", messages=MSG)
        tally.add(200)
    assert _stream_sdk(bob, tally, model="gpt-4o-mini")
    wait_for(lambda: total(scrape(base, ADMIN), "meterproxy_usage_backlog") == 3, 5, "backlog of the outage")
    # Keep Redis down until Prometheus has seen both the backlog and a rising store-error count.
    wait_for(lambda: (prom.scalar("max_over_time(meterproxy_usage_backlog[1m])") or 0) >= 3
             and (prom.scalar("sum(rate(meterproxy_store_errors_total[1m]))") or 0) > 0, 20,
             "Prometheus saw the outage")
    redis.start()  # same port and dir: reloads the AOF
    pg.start()
    # Reconnect the proxy's pooled connections (each stale one fails once) before metering resumes.
    for _ in range(2):
        wait_for(lambda: all(c == 200 for c in _parallel_readyz(base)), 15, "store reachable again")
    wait_for(lambda: total(scrape(base, ADMIN), "meterproxy_usage_backlog") == 0, 15, "backlog drained")

    round_of_traffic(base, tally)
    px.signal(signal.SIGHUP)
    # Everything scraped: Prometheus has the final counts, and a few samples after them.
    wait_for(lambda: total(scrape(base, ADMIN), "meterproxy_config_reloads_total", result="ok") == 2, 10, "reloads")
    final = scrape(base, ADMIN)
    want_requests = total(final, "meterproxy_requests_total")
    assert want_requests == sum(tally.statuses.values())
    t_final = time.time()
    wait_for(lambda: prom.scalar("sum(meterproxy_requests_total)") == want_requests, 20, "final counts scraped")
    time.sleep(max(0.0, 3 - (time.time() - t_final)))  # and >= 2 more samples of every series


def _parallel_readyz(base: str) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: httpx.get(f"{base}/readyz", timeout=5).status_code, range(8)))


# --- tests ----------------------------------------------------------------------------------------

def _legends() -> dict[str, list[str]]:
    """expr -> the `{{label}}` names its legends show (a `sum by (label)` the proxy must export)."""
    out: dict[str, list[str]] = {}

    def walk(panels: list[Any]) -> None:
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    names = re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat") or "")
                    out.setdefault(t["expr"], []).extend(names)
            walk(p.get("panels") or [])

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def check_expr(prom: Prometheus, expr: str, labels: list[str]) -> str | None:
    """None if `expr` returns at least one series with a number and, on every series, each label of
    `labels` (the legend's) and of its `by (...)` clauses (`le` aside, histogram_quantile eats it);
    else why not. An aggregation by a label the proxy does not export yields series without it."""
    labels = [*labels, *(lbl for grp in re.findall(r"\bby\s*\(([^)]*)\)", expr)
                         for lbl in (x.strip() for x in grp.split(",")) if lbl and lbl != "le")]
    ans = prom.query(expr)
    if ans.get("status") != "success":
        return f"error {ans.get('errorType')}: {ans.get('error')}"
    result = ans["data"]["result"]
    if ans["data"]["resultType"] != "vector":
        return f"result type {ans['data']['resultType']}"
    if not result:
        return "no series"
    if all(math.isnan(float(s["value"][1])) for s in result):
        return f"only NaN: {result}"
    for lbl in labels:
        if not all(s["metric"].get(lbl) for s in result):
            return f"series without label {lbl!r}: {result}"
    return None


def test_every_dashboard_query_returns_series(monitored: Monitored) -> None:
    exprs = list(dict.fromkeys(dashboard_exprs(DASHBOARD)))
    assert len(exprs) >= 30, exprs  # every panel target plus the variables' selectors
    legends = _legends()
    failures = []
    for values in SELECTIONS:
        for raw in exprs:
            expr = substitute(raw, values)
            why = check_expr(monitored.prom, expr, legends.get(raw, []))
            if why is not None:
                failures.append(f"{values or 'All'}: {expr}\n    -> {why}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures) + \
        "\n--- prometheus log ---\n" + monitored.prom.output()[-3000:]


def test_dashboard_check_catches_unknown_metrics_and_labels(monitored: Monitored) -> None:
    """The check above must fail for a panel on a metric or label the proxy does not export."""
    prom = monitored.prom
    good = 'sum by (user) (rate(meterproxy_cost_usd_total{user=~"alice"}[1m]))'
    assert check_expr(prom, good, ["user"]) is None
    assert check_expr(prom, good.replace("cost_usd", "cost_eur"), ["user"]) == "no series"
    assert check_expr(prom, good.replace('{user=~"alice"}', '{customer=~"alice"}'), ["user"]) == "no series"
    assert "without label 'customer'" in (check_expr(prom, good.replace("by (user)", "by (customer)"), []) or "")
    assert check_expr(prom, "sum(rate(meterproxy_requests_total[1m]", []) is not None  # a syntax error


def test_workload_produced_every_kind_of_series(monitored: Monitored) -> None:
    """The mixed workload really has what the panels show (so an empty panel means a broken query)."""
    s = scrape(monitored.px.base, ADMIN)
    assert {lbl["limit"] for n, lbl, v in s if n == "meterproxy_rate_limited_total" and v} == \
        {"requests", "tokens", "concurrency"}
    statuses = {lbl["status"] for n, lbl, v in s if n == "meterproxy_requests_total" and v}
    assert {"200", "429", "500", "502"} <= statuses
    assert total(s, "meterproxy_upstream_errors_total", provider="dead") == 2
    assert total(s, "meterproxy_upstream_errors_total", provider="sim") == 2  # the broken streams
    assert total(s, "meterproxy_tokens_total", source="estimated") > 0
    assert total(s, "meterproxy_tokens_total", type="cached_prompt") == 8
    assert total(s, "meterproxy_tokens_total", type="reasoning") > 0
    assert total(s, "meterproxy_unpriced_requests_total", model="o3-mini") == 3 + 2 + 3  # rounds and outage
    assert total(s, "meterproxy_store_errors_total") > 0
    assert total(s, "meterproxy_time_to_first_token_seconds_count") == monitored.tally.streams
    assert total(s, "meterproxy_request_duration_seconds_count") == monitored.tally.forwarded
    assert total(s, "meterproxy_overhead_seconds_count") == monitored.tally.forwarded
    assert total(s, "meterproxy_inflight_requests") == 0
    assert total(s, "meterproxy_usage_backlog") == 0


def test_metrics_equal_ledger_one_worker(monitored: Monitored) -> None:
    px, prom = monitored.px, monitored.prom
    samples = scrape(px.base, ADMIN)
    ledger = ledger_total(px.base)
    # Nothing was lost to the outage: the backlog reached the ledger, and nothing counted twice.
    assert_metrics_equal_ledger(samples, ledger, monitored.tally)
    # ... and Prometheus holds the same values the proxy exports.
    assert prom.scalar("sum(meterproxy_requests_total)") == total(samples, "meterproxy_requests_total")
    assert prom.scalar('sum(meterproxy_tokens_total{type="completion"})') == ledger["completion_tokens"]
    assert prom.scalar("sum(meterproxy_cost_usd_total)") == pytest.approx(ledger["cost_nano"] / 1e9, rel=1e-9)


def test_metrics_require_admin(monitored: Monitored) -> None:
    """server.metrics_require_admin: refused without a key (403 admin_required, unlike /admin/*'s
    401) and for a client key; Prometheus scrapes with the admin key as bearer token (its target is
    up, and it holds the data the tests above query)."""
    base = monitored.px.base
    assert httpx.get(f"{base}/metrics").status_code == 403
    assert httpx.get(f"{base}/metrics", headers=bearer("alice-1")).status_code == 403
    assert scrape(base, ADMIN)
    assert monitored.prom.scalar('up{job="meterproxy"}') == 1


def test_alert_rules_evaluate_against_the_proxy(monitored: Monitored) -> None:
    prom = monitored.prom
    rules = httpx.get(f"{prom.base}/api/v1/rules").json()["data"]["groups"]
    assert {"meterproxy", "meterproxy-budgets"} <= {g["name"] for g in rules}
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] == "err"]
    assert not bad, bad

    def active() -> dict[str, str]:
        alerts = httpx.get(f"{prom.base}/api/v1/alerts").json()["data"]["alerts"]
        return {a["labels"]["alertname"]: a["state"] for a in alerts}

    # The outage is an active store alert (pending: it needs 2 m), o3-mini an unpriced-model alert.
    wait_for(lambda: active().get("MeterproxyStoreDown") in ("pending", "firing")
             and active().get("MeterproxyUnpricedModel") == "firing", 10, f"alerts: {active()}")
    assert "MeterproxyDown" not in active()


def test_metrics_equal_ledger_two_workers(tmp_path: Path, redis_url: str) -> None:
    """`--workers 2`: requests spread over both workers; one /metrics sums them, equal to the ledger —
    on the main listener and on the separate `server.metrics_port` listener alike."""
    mp_dir = tmp_path / "prom-mp"
    mp_dir.mkdir()
    metrics_port = free_port()
    with simulator() as sim:
        cfg = make_config(sim.port, store_url=redis_url, server={"metrics_port": metrics_port})
        path = write_config(tmp_path / "config.yaml", cfg)
        with proxy(path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}) as px:
            tally = Tally()
            kinds: list[tuple[str, dict[str, Any], dict[str, str]]] = [
                ("alice-1", {"model": "gpt-5.4", "messages": MSG}, {}),
                ("bob-1", {"model": "gpt-4o-mini", "messages": MSG, "stream": True}, {}),
                ("carol-1", {"model": "o3-mini", "messages": MSG}, {}),
                ("alice-2", {"model": "gpt-5.4", "messages": MSG, "stream": True}, {"x-sim-omit-usage": "1"}),
            ]

            def one(i: int) -> int:
                key, body, headers = kinds[i % len(kinds)]
                return _post(px.base, key, tally, body, **headers)  # a new connection per request

            def workers_that_counted() -> set[str]:
                return {f.name.split("_")[-1] for f in mp_dir.glob("counter_*.db")}

            sent = 0
            for _ in range(5):  # the kernel spreads connections; a few rounds make both workers serve
                with ThreadPoolExecutor(16) as pool:
                    codes = list(pool.map(one, range(sent, sent + 48)))
                sent += 48
                assert set(codes) == {200}, Counter(codes)
                if len(workers_that_counted()) >= 2:
                    break
            assert len(workers_that_counted()) == 2, list(mp_dir.iterdir())

            wait_for(lambda: ledger_total(px.base)["requests"] == sent, 15, "ledger caught up")
            samples = scrape(px.base)
            assert total(samples, "meterproxy_requests_total") == sent == tally.forwarded
            assert_metrics_equal_ledger(samples, ledger_total(px.base), tally)
            assert total(samples, "meterproxy_tokens_total", source="estimated") > 0
            # Histograms and live gauges aggregate too.
            assert total(samples, "meterproxy_request_duration_seconds_count") == sent
            assert total(samples, "meterproxy_overhead_seconds_count") == sent
            assert total(samples, "meterproxy_time_to_first_token_seconds_count") == tally.streams > 0
            assert total(samples, "meterproxy_inflight_requests") == 0
            # Whichever worker answers /metrics, the view is the same; so is the metrics_port
            # listener's (one worker holds that port).
            for base in [px.base] * 5 + [f"http://127.0.0.1:{metrics_port}"]:
                again = scrape(base)
                for name in ("meterproxy_requests_total", "meterproxy_tokens_total",
                             "meterproxy_request_duration_seconds_count"):
                    assert total(again, name) == total(samples, name), (base, name)
                assert total(again, "meterproxy_cost_usd_total") == pytest.approx(
                    total(samples, "meterproxy_cost_usd_total"), rel=1e-12)
    assert os.path.isdir(mp_dir)  # ours, so the proxy did not remove it
