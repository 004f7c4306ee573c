"""dashboards/meterproxy.json: schema, variables, required panels, PromQL over SPEC metrics only."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard_queries import SPEC_METRICS, VARIABLES, dashboard_exprs, substitute
from tests.procs import ROOT

DASHBOARD = ROOT / "dashboards" / "meterproxy.json"
PROVISIONING = ROOT / "dashboards" / "provisioning"

_METRIC_RE = re.compile(r"meterproxy_[a-z_]+")
_SELECTOR_RE = re.compile(r"(meterproxy_[a-z_]+)\{([^}]*)\}")
_MATCHER_RE = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_MACRO_RE = re.compile(r"\$\{?(__\w+)")

REQUIRED_PANELS = {
    "Requests/s by status": ["meterproxy_requests_total"],
    "Error ratio": ["meterproxy_requests_total", "meterproxy_upstream_errors_total"],
    "Request duration p50 / p95 / p99": ["meterproxy_request_duration_seconds_bucket"],
    "Time to first token p50 / p95": ["meterproxy_time_to_first_token_seconds_bucket"],
    "Proxy overhead p50 / p99": ["meterproxy_overhead_seconds_bucket"],
    "Tokens/s by type": ["meterproxy_tokens_total"],
    "Cost per hour by user": ["meterproxy_cost_usd_total"],
    "Cost per hour by model": ["meterproxy_cost_usd_total"],
    "Top 10 users by cost (time range)": ["meterproxy_cost_usd_total"],
    "Rate-limited requests/s by limit": ["meterproxy_rate_limited_total"],
    "In-flight requests by provider": ["meterproxy_inflight_requests"],
    "Store errors/s by operation": ["meterproxy_store_errors_total"],
    "Usage backlog": ["meterproxy_usage_backlog"],
}


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_all_panels(p.get("panels") or []))
    return out


def _base_metric(name: str) -> str:
    if name in SPEC_METRICS:
        return name
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    assert SPEC_METRICS.get(base, ("", ()))[0] == "histogram", f"not a SPEC metric: {name}"
    return base


def test_dashboard_schema() -> None:
    doc = _doc()
    assert doc["uid"] == "meterproxy"
    assert 39 <= doc["schemaVersion"] <= 41
    panels = _all_panels(doc["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] in {"row", "timeseries", "stat", "table", "bargauge"}, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
                assert t["expr"].strip()
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in _doc()["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in VARIABLES:
        v = variables[name]
        assert v["type"] == "query", name
        assert v["multi"] is True and v["includeAll"] is True and v["allValue"] == ".*", name
        assert v["datasource"]["uid"] == "${datasource}"
        query = v["query"]["query"]
        pattern = rf"label_values\(meterproxy_requests_total(\{{[^}}]*\}})?, {name}\)"
        assert re.fullmatch(pattern, query), query
        assert v["definition"] == v["query"]["query"]


def test_required_panels_present_and_query_their_metric() -> None:
    by_title = {p["title"]: p for p in _all_panels(_doc()["panels"])}
    for title, metrics in REQUIRED_PANELS.items():
        assert title in by_title, f"missing panel {title!r}"
        exprs = " ".join(t["expr"] for t in by_title[title]["targets"])
        for metric in metrics:
            assert metric in exprs, (title, metric)
    latency = " ".join(t["expr"] for t in by_title["Request duration p50 / p95 / p99"]["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in latency


def test_every_expr_uses_only_spec_metrics_and_known_macros() -> None:
    exprs = dashboard_exprs(DASHBOARD)
    assert len(exprs) >= len(REQUIRED_PANELS) + len(VARIABLES)
    for expr in exprs:
        names = _METRIC_RE.findall(expr)
        assert names, f"expr queries no meterproxy metric: {expr}"
        for name in names:
            _base_metric(name)
        assert set(_MACRO_RE.findall(expr)) <= {"__rate_interval", "__range"}, expr


def test_variable_filters_only_on_labels_the_metric_has() -> None:
    """`user=~"$user"` on a metric without `user` would empty the panel once a user is picked."""
    used: set[str] = set()
    for expr in dashboard_exprs(DASHBOARD):
        for metric, body in _SELECTOR_RE.findall(expr):
            labels = SPEC_METRICS[_base_metric(metric)][1]
            for label, op, value in _MATCHER_RE.findall(body):
                assert label in labels, (metric, label, expr)
                m = re.fullmatch(r"\$(\w+)", value)
                if m:
                    assert op == "=~" and m.group(1) == label, expr
                    used.add(label)
    assert used == set(VARIABLES)


def test_substituted_exprs_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule), so syntax errors fail here."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package prometheus)"
    exprs = [substitute(e, {}) for e in dashboard_exprs(DASHBOARD)]
    for e in exprs:
        assert "$" not in e, e
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


def test_substitute() -> None:
    expr = ('sum(rate(m{user=~"$user", key=~"${key}", model=~"${model:regex}"}[$__rate_interval]))'
            ' + increase(m{provider=~"$provider"}[$__range]) + rate(m[$__interval])')
    out = substitute(expr, {"user": "alice|bob", "key": "k1"})
    assert out == ('sum(rate(m{user=~"alice|bob", key=~"k1", model=~".*"}[1m]))'
                   ' + increase(m{provider=~".*"}[1h]) + rate(m[15s])')
    assert substitute("x[$__range]", {"__range": "30d"}) == "x[30d]"
    with pytest.raises(KeyError, match=r"\$nope"):
        substitute('m{a=~"$nope"}', {})


def test_dashboard_exprs_reads_nested_rows_and_variables(tmp_path: Path) -> None:
    doc = {
        "panels": [
            {"type": "timeseries", "targets": [{"refId": "A", "expr": "a"}, {"refId": "B"}]},
            {"type": "row", "collapsed": True, "panels": [
                {"type": "stat", "targets": [{"refId": "A", "expr": "b"}]}]},
        ],
        "templating": {"list": [
            {"type": "datasource", "query": "prometheus"},
            {"type": "query", "query": {"query": 'label_values(c{x="1"}, user)'}},
            {"type": "query", "query": "label_values(user)"},
            {"type": "query", "query": "query_result(topk(3, d))"},
        ]},
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    assert dashboard_exprs(path) == ["a", "b", 'c{x="1"}', "topk(3, d)"]


def test_provisioning() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((PROVISIONING / "dashboards" / "meterproxy.yaml").read_text())
    [provider] = dash["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    # The dashboard's default data source is the provisioned one.
    current = next(v for v in _doc()["templating"]["list"] if v["name"] == "datasource")["current"]
    assert current["value"] == source["uid"]


def test_no_panel_adds_token_types_that_are_parts_of_others() -> None:
    """cached_prompt and cache_write are parts of prompt, reasoning of completion (SPEC): a query
    over meterproxy_tokens_total either keeps types apart (`by (type)`) or selects only the
    wholes (prompt|completion); summing every type would count cache writes twice."""
    import re

    exprs = [t["expr"] for p in _all_panels(_doc()["panels"]) for t in p.get("targets", [])
             if "meterproxy_tokens_total" in t.get("expr", "")]
    assert exprs
    for expr in exprs:
        keeps_apart = re.search(r"by \([^)]*\btype\b", expr) is not None
        wholes_only = 'type=~\\"prompt|completion\\"' in expr or 'type=~"prompt|completion"' in expr
        assert keeps_apart or wholes_only, expr
