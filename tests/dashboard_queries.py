"""Helpers to read PromQL out of the Grafana dashboard and make it evaluable outside Grafana.

Used by tests/test_dashboard.py and by the end-to-end test that evaluates every dashboard query
against a real Prometheus scraping a running proxy.

The dashboard uses only these Grafana macros, which `substitute` replaces with fixed values:

- `$__rate_interval` -> `1m`  (Grafana: max(4 x scrape interval, $__interval); 4 x 15 s here)
- `$__range`         -> `1h`  (the dashboard's time range, used by "top users by cost")
- `$__interval`      -> `15s` (not used by the dashboard; supported for completeness)

and the template variables `$user`, `$key`, `$model`, `$provider` (multi-value, All = `.*`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: docs/metrics.md table: exposed name -> (type, labels). The contract the code, the
#: dashboard and the alerts are checked against.
SPEC_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "meterproxy_requests_total": ("counter", ("key", "user", "provider", "model", "status")),
    "meterproxy_tokens_total": ("counter", ("key", "user", "provider", "model", "type", "source")),
    "meterproxy_cost_usd_total": ("counter", ("key", "user", "provider", "model")),
    "meterproxy_rate_limited_total": ("counter", ("key", "user", "limit")),
    "meterproxy_request_duration_seconds": ("histogram", ("provider", "model", "stream")),
    "meterproxy_time_to_first_token_seconds": ("histogram", ("provider", "model")),
    "meterproxy_overhead_seconds": ("histogram", ()),
    "meterproxy_upstream_errors_total": ("counter", ("provider", "kind")),
    "meterproxy_inflight_requests": ("gauge", ("provider",)),
    "meterproxy_store_errors_total": ("counter", ("operation",)),
    "meterproxy_usage_backlog": ("gauge", ()),
    "meterproxy_unpriced_requests_total": ("counter", ("model",)),
    "meterproxy_config_reloads_total": ("counter", ("result",)),
    "meterproxy_ledger_writes_total": ("counter", ("result",)),
    "meterproxy_export_pending": ("gauge", ("exporter",)),
}

#: Dashboard template variables; each has All = `.*`, used when `values` leaves one out.
VARIABLES: tuple[str, ...] = ("user", "key", "model", "provider")

#: Grafana macros the dashboard may use, with the value `substitute` gives them.
MACROS: dict[str, str] = {"__rate_interval": "1m", "__range": "1h", "__interval": "15s"}

# `${name}`, `${name:format}` and `$name`; names are word characters (macros start with `__`).
_VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)")
# label_values(metric_selector, label) -> the selector; label_values(label) has none.
_LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)
_QUERY_RESULT_RE = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def _panel_exprs(panels: list[Any]) -> list[str]:
    out: list[str] = []
    for panel in panels:
        if not isinstance(panel, dict):
            continue
        for target in panel.get("targets") or []:
            if isinstance(target, dict) and isinstance(target.get("expr"), str) and target["expr"]:
                out.append(target["expr"])
        # Collapsed rows keep their panels nested under the row.
        out.extend(_panel_exprs(panel.get("panels") or []))
    return out


def _variable_exprs(templating: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for var in templating.get("list") or []:
        if not isinstance(var, dict) or var.get("type") != "query":
            continue
        query = var.get("query")
        # Grafana >= 10 stores {"query": "...", "refId": ...}; older versions a plain string.
        text = query.get("query") if isinstance(query, dict) else query
        if not isinstance(text, str):
            continue
        m = _LABEL_VALUES_RE.match(text) or _QUERY_RESULT_RE.match(text)
        if m:
            out.append(m.group(1).strip())
    return out


def dashboard_exprs(path: str | Path) -> list[str]:
    """Every PromQL expression in the dashboard at `path`, in document order.

    Panel targets' `expr` (including panels nested in collapsed rows), then the metric
    selectors inside template variables' `label_values(selector, label)` / `query_result(expr)`.
    Expressions are returned raw; pass them through `substitute` before evaluating.
    """
    doc = json.loads(Path(path).read_text())
    exprs = _panel_exprs(doc.get("panels") or [])
    exprs.extend(_variable_exprs(doc.get("templating") or {}))
    return exprs


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables and macros in `expr` so Prometheus can evaluate it.

    `values` maps variable names (`user`, `key`, `model`, `provider`) to the text inserted
    verbatim — inside `=~"..."` it is a regex, e.g. `alice|bob`; a dashboard variable left out
    gets its All value `.*`. Macros get `MACROS` unless `values` overrides them. Any other
    variable raises KeyError, so an unknown `$name` never reaches Prometheus.
    """

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        if name in MACROS:
            return MACROS[name]
        if name in VARIABLES:
            return ".*"
        raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")

    return _VAR_RE.sub(repl, expr)
