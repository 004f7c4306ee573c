"""Issue #3 "done when": metering is exact, end to end, over real processes.

A mixed workload goes through a real proxy process to the real simulator process. The simulator
is the provider, so its own account of what it produced (GET /_sim/stats) is the truth: every
token of it must show up exactly — no more, no less — in the Prometheus counters, in the ledger
totals, in every ledger record, in /usage and in `meterproxy usage`; and the cost must be the
config's prices applied per request, computed here independently with Decimal.

Requests are sent one after another and /_sim/stats is read after each one, so the truth is
known per request, not only in sum; each request carries its own x-request-id, which the ledger
records keep, so every record is checked against the request that produced it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import ADMIN_KEY, ENV, KEYS, bearer, make_config, proxy, write_config
from tests.procs import ROOT, Proc, simulator

TYPES = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")
# meterproxy_tokens_total{type} → usage field
METRIC_TYPES = {"prompt": "prompt_tokens", "cached_prompt": "cached_prompt_tokens",
                "completion": "completion_tokens", "reasoning": "reasoning_tokens"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LONG = [{"role": "system", "content": "You are a careful assistant who answers in plain words."},
        {"role": "user", "content": "Tell me about rivers, stones, clouds and the quiet light "
                                    "of a long evening by the water."}]
MSG = [{"role": "user", "content": "Tell me about rivers and stones."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                          "days": {"type": "integer"}},
                         "required": ["city"]}}}]
UNPRICED = "gpt-3.5-turbo"
# /usage limits for alice-1, so its "limits" object is not empty and can be checked.
ALICE_LIMITS = {"rpm": 1000, "daily_tokens": 10_000_000, "monthly_usd": 100}


# --- helpers -------------------------------------------------------------------------------------

def sim_usage(sim: Proc) -> dict[str, int]:
    usage: dict[str, int] = httpx.get(f"{sim.base}/_sim/stats").json()["usage"]
    return usage


def admin_get(px: Proc, path: str, **params: str) -> Any:
    r = httpx.get(f"{px.base}{path}", params=params, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def all_records(px: Proc, page: int = 7) -> list[dict[str, Any]]:
    """Every ledger record, paginated with since_id (small pages, so pagination is exercised)."""
    out: list[dict[str, Any]] = []
    since = ""
    while True:
        body = admin_get(px, "/admin/usage/records", since_id=since, limit=str(page))
        out += body["records"]
        if not body["records"]:
            assert body["next_since_id"] == (since or "0")
            return out
        assert body["next_since_id"] == body["records"][-1]["id"]
        since = body["next_since_id"]


def wait_records(px: Proc, pred: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 10.0) -> list[dict[str, Any]]:
    """Poll the records until `pred` holds (the ledger writer runs after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = all_records(px, page=1000)
        if pred(recs):
            return recs
        if time.monotonic() > deadline:
            pytest.fail(f"ledger never reached the expected state; records: {recs}")
        time.sleep(0.05)


def record_of(px: Proc, rid: str) -> dict[str, Any]:
    recs = wait_records(px, lambda rs: any(r["request_id"] == rid for r in rs))
    mine = [r for r in recs if r["request_id"] == rid]
    assert len(mine) == 1, mine
    return mine[0]


def scrape(px: Proc) -> list[Any]:
    text = httpx.get(f"{px.base}/metrics").text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_sum(samples: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def tokens_by_type(samples: list[Any], **labels: str) -> dict[str, int]:
    out = {f: 0 for f in TYPES}
    for s in samples:
        if s.name == "meterproxy_tokens_total" and all(s.labels.get(k) == v for k, v in labels.items()) \
                and s.labels["type"] in METRIC_TYPES:   # cache_write: the OpenAI simulator writes none
            out[METRIC_TYPES[s.labels["type"]]] += int(s.value)
    return out


def usage_fields(obj: dict[str, Any]) -> dict[str, int]:
    return {f: obj[f] for f in TYPES}


def price_of(pricing: dict[str, dict[str, float]], model: str) -> dict[str, Decimal] | None:
    """The config's price for `model`: exact id, then globs (longest first), as SPEC says."""
    p = pricing.get(model)
    if p is None:
        globs = sorted((k for k in pricing if set("*?[") & set(k)), key=len, reverse=True)
        p = next((pricing[g] for g in globs if fnmatch.fnmatchcase(model, g)), None)
    if p is None:
        return None
    inp = Decimal(str(p["input"]))
    return {"input": inp, "cached_input": Decimal(str(p.get("cached_input", p["input"]))),
            "output": Decimal(str(p["output"]))}


def expected_cost(pricing: dict[str, dict[str, float]], model: str, u: dict[str, int]) -> Decimal:
    """USD: uncached prompt * input + cached * cached_input + completion * output, per million."""
    p = price_of(pricing, model)
    if p is None:
        return Decimal(0)
    cached = u["cached_prompt_tokens"]
    return (Decimal(u["prompt_tokens"] - cached) * p["input"] + Decimal(cached) * p["cached_input"]
            + Decimal(u["completion_tokens"]) * p["output"]) / Decimal(1_000_000)


def to_nano(usd: Decimal) -> int:
    nano = usd * Decimal(1_000_000_000)
    assert nano == nano.to_integral_value(), f"{usd} USD is not a whole number of nano-USD"
    return int(nano)


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {f: a[f] + b[f] for f in TYPES}


ZERO = {f: 0 for f in TYPES}


def cli_usage(config: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "meterproxy", "usage", "--config", str(config), *args],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                       env={**os.environ, **ENV})
    assert r.returncode == 0, r.stderr
    return r.stdout


def total_line(table: str) -> list[str]:
    lines = [ln for ln in table.splitlines() if ln.split()[:1] == ["TOTAL"]]
    assert len(lines) == 1, table
    return lines[0].split()[1:]


# --- the workload --------------------------------------------------------------------------------

@dataclass
class Sent:
    rid: str
    key: str
    model: str          # the model the request named (an async run's polls: the run's model)
    usage: dict[str, int]


class Workload:
    """Sends requests one at a time and takes the simulator's usage delta after each."""

    def __init__(self, sim: Proc, px: Proc) -> None:
        self.sim, self.px = sim, px
        self.sent: list[Sent] = []
        self.last = sim_usage(sim)

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.px.base}/v1", api_key=KEYS[key][1], max_retries=0)

    def run(self, name: str, key: str, model: str,
            fn: Callable[[dict[str, str]], dict[str, int] | None]) -> dict[str, int]:
        """Run `fn(headers)` (it must consume the whole response); return the request's usage.

        `fn` may return the usage the client itself saw, which must equal the simulator's delta.
        """
        rid = f"wl-{len(self.sent):02d}-{name}"
        seen = fn({"x-request-id": rid})
        now = sim_usage(self.sim)
        delta = {f: now[f] - self.last[f] for f in TYPES}
        self.last = now
        if seen is not None:
            assert seen == delta, (name, seen, delta)
        self.sent.append(Sent(rid, key, model, delta))
        return delta


def _sdk_usage(u: Any) -> dict[str, int]:
    """A chat/completions usage object from the SDK as a usage dict."""
    return {"prompt_tokens": u.prompt_tokens,
            "cached_prompt_tokens": (u.prompt_tokens_details.cached_tokens or 0)
            if u.prompt_tokens_details else 0,
            "completion_tokens": u.completion_tokens,
            "reasoning_tokens": (u.completion_tokens_details.reasoning_tokens or 0)
            if u.completion_tokens_details else 0}


def _responses_usage(u: Any) -> dict[str, int]:
    return {"prompt_tokens": u.input_tokens, "cached_prompt_tokens": u.input_tokens_details.cached_tokens,
            "completion_tokens": u.output_tokens,
            "reasoning_tokens": u.output_tokens_details.reasoning_tokens}


def run_workload(w: Workload) -> str:
    """The mixed workload of issue #3; returns the async run's uid."""
    px = w.px

    def chat(key: str, *, usage_chunk: bool = False, cached: str = "",
             **kw: Any) -> Callable[[dict[str, str]], Any]:
        def go(h: dict[str, str]) -> dict[str, int] | None:
            client = w.sdk(key)
            if cached:      # the simulator reports this many cached prompt tokens
                h = {**h, "x-sim-cached-tokens": cached}
            if not kw.get("stream"):
                resp = client.chat.completions.create(extra_headers=h, **kw)
                assert resp.choices and resp.usage is not None
                return _sdk_usage(resp.usage)
            chunks = list(client.chat.completions.create(extra_headers=h, **kw))
            assert chunks
            if not usage_chunk:     # the client did not ask for usage: it sees none
                assert all(c.usage is None and c.choices for c in chunks)
                return None
            assert chunks[-1].choices == [] and chunks[-1].usage is not None
            assert all(c.usage is None for c in chunks[:-1])
            return _sdk_usage(chunks[-1].usage)
        return go

    inc = {"include_usage": True}
    # OpenAI flavor through the official SDK: stream and not, with and without include_usage.
    w.run("chat", "alice-1", "gpt-5.4", chat("alice-1", model="gpt-5.4", messages=MSG))
    w.run("chat-stream", "alice-1", "gpt-5.4",
          chat("alice-1", model="gpt-5.4", messages=LONG, stream=True))
    w.run("chat-stream-usage", "alice-1", "gpt-4o-mini",
          chat("alice-1", usage_chunk=True, model="gpt-4o-mini", messages=LONG, stream=True,
               stream_options=inc))
    # Reasoning model, priced by the `o4-*` glob.
    u = w.run("o4", "alice-2", "o4-mini",
              chat("alice-2", model="o4-mini", messages=MSG, reasoning_effort="low"))
    assert u["reasoning_tokens"] > 0
    w.run("o4-stream", "alice-2", "o4-mini",
          chat("alice-2", model="o4-mini", messages=LONG, stream=True, reasoning_effort="high"))
    # Cached prompt tokens (the simulator reports what x-sim-cached-tokens says).
    u = w.run("cached", "alice-1", "gpt-5.4",
              chat("alice-1", model="gpt-5.4", messages=LONG, cached="9"))
    assert u["cached_prompt_tokens"] == 9
    u = w.run("cached-stream", "alice-1", "gpt-4o-mini",
              chat("alice-1", model="gpt-4o-mini", messages=LONG, stream=True,
                   cached="17"))
    assert u["cached_prompt_tokens"] == 17
    # Tools and n=2.
    w.run("tools-stream", "bob-1", "gpt-4o-mini",
          chat("bob-1", model="gpt-4o-mini", messages=MSG, tools=TOOLS, stream=True))
    w.run("tools", "bob-1", "gpt-5.4", chat("bob-1", model="gpt-5.4", messages=MSG, tools=TOOLS))
    w.run("n2", "bob-1", "gpt-4o-mini", chat("bob-1", model="gpt-4o-mini", messages=MSG, n=2))
    w.run("n2-stream", "bob-1", "gpt-4o-mini",
          chat("bob-1", usage_chunk=True, model="gpt-4o-mini", messages=LONG, n=2, stream=True,
               stream_options=inc))
    w.run("unpriced", "alice-2", UNPRICED, chat("alice-2", model=UNPRICED, messages=MSG))

    # Vendor-prefixed flavor: x-api-key, vendor model ids (httpx: the SDK sends Bearer).
    vendor = {"x-api-key": KEYS["bob-1"][1]}

    def v4(h: dict[str, str]) -> dict[str, int]:
        r = httpx.post(f"{px.base}/v4/beta/chat/completions", headers={**vendor, **h},
                       json={"model": "openai/gpt-4o", "messages": LONG})
        assert r.status_code == 200, r.text
        return _usage_dict(r.json()["usage"])

    def v4_stream(h: dict[str, str]) -> None:
        with httpx.stream("POST", f"{px.base}/v4/beta/chat/completions", headers={**vendor, **h},
                          json={"model": "openai/gpt-4o", "messages": MSG, "stream": True}) as r:
            assert r.status_code == 200
            text = r.read().decode()
        # No usage object reaches a client that did not ask ("usage":null members may: SPEC).
        assert "[DONE]" in text and '"usage":{' not in text

    w.run("v4", "bob-1", "openai/gpt-4o", v4)
    w.run("v4-stream", "bob-1", "openai/gpt-4o", v4_stream)

    # Streaming-by-default flavor: no "stream" field is a stream.
    def v3(h: dict[str, str]) -> None:
        with httpx.stream("POST", f"{px.base}/v3/ai/chat_completion", headers={**bearer("bob-1"), **h},
                          json={"model": "gpt-5.4", "messages": LONG}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = r.read().decode()
        assert "data: [DONE]" in text and '"usage":{' not in text

    w.run("v3-default-stream", "bob-1", "gpt-5.4", v3)

    # Embeddings, Responses (stream and not), legacy completions (stream and not).
    def emb(h: dict[str, str]) -> dict[str, int]:
        r = w.sdk("alice-1").embeddings.create(model="text-embedding-3-small",
                                               input=["rivers and stones", "quiet light"],
                                               extra_headers=h)
        assert len(r.data) == 2
        return {**ZERO, "prompt_tokens": r.usage.prompt_tokens}

    def resp(h: dict[str, str]) -> dict[str, int]:
        r = w.sdk("alice-2").responses.create(model="gpt-5.4", input="Tell me about rivers.",
                                              instructions="Be brief.", extra_headers=h)
        assert r.output_text and r.usage is not None
        return _responses_usage(r.usage)

    def resp_stream(h: dict[str, str]) -> dict[str, int]:
        events = list(w.sdk("alice-2").responses.create(
            model="gpt-4o-mini", input="Tell me about stones.", stream=True,
            extra_headers={**h, "x-sim-cached-tokens": "3"}))
        assert events[-1].type == "response.completed"
        return _responses_usage(events[-1].response.usage)

    def completions(h: dict[str, str]) -> dict[str, int]:
        r = w.sdk("alice-1").completions.create(model="gpt-4o-mini", prompt="Once upon a time",
                                                max_tokens=12, extra_headers=h)
        assert r.usage is not None
        return {**ZERO, "prompt_tokens": r.usage.prompt_tokens,
                "completion_tokens": r.usage.completion_tokens}

    def completions_stream(h: dict[str, str]) -> None:
        chunks = list(w.sdk("alice-1").completions.create(
            model="gpt-4o-mini", prompt=["Once upon a time", "In a land"], stream=True,
            extra_headers=h))
        assert chunks and all(c.usage is None for c in chunks)

    w.run("embeddings", "alice-1", "text-embedding-3-small", emb)
    u = w.run("responses", "alice-2", "gpt-5.4", resp)
    assert u["reasoning_tokens"] > 0
    u = w.run("responses-stream", "alice-2", "gpt-4o-mini", resp_stream)
    assert u["cached_prompt_tokens"] == 3
    w.run("completions", "alice-1", "gpt-4o-mini", completions)
    w.run("completions-stream", "alice-1", "gpt-4o-mini", completions_stream)

    # An async run, created by carol-1 and polled three times (running, completed, completed).
    uid = ""

    def create(h: dict[str, str]) -> dict[str, int]:
        nonlocal uid
        r = httpx.post(f"{px.base}/v3/ai/chat_completion", headers={**bearer("carol-1"), **h},
                       json={"model": "gpt-5.4", "messages": LONG, "async": True, "stream": False})
        assert r.status_code == 200, r.text
        uid = r.json()["uid"]
        return ZERO

    w.run("async-create", "carol-1", "gpt-5.4", create)
    statuses = []
    for i in range(3):
        def poll(h: dict[str, str]) -> None:
            r = httpx.get(f"{px.base}/v3/ai/chat_completion_runs/{uid}",
                          headers={**bearer("carol-1"), **h})
            assert r.status_code == 200, r.text
            statuses.append(r.json()["status"])
        w.run(f"async-poll-{i}", "carol-1", "gpt-5.4", poll)
    assert statuses == ["running", "completed", "completed"]
    return uid


def _usage_dict(u: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": u["prompt_tokens"],
            "cached_prompt_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "completion_tokens": u["completion_tokens"],
            "reasoning_tokens": (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)}


def test_metering_exact_end_to_end(tmp_path: Path, store_url: str | None) -> None:
    with simulator() as sim:
        cfg = make_config(sim.port, store_url=store_url, keys={"alice-1": {"limits": ALICE_LIMITS}})
        path = write_config(tmp_path / "config.yaml", cfg)
        with proxy(path) as px:
            _metering_exact(sim, px, path, cfg, store_url)


def _metering_exact(sim: Proc, px: Proc, path: Path, cfg: dict[str, Any], store_url: str | None) -> None:
    assert httpx.post(f"{sim.base}/_sim/reset").json() == {"ok": True}
    w = Workload(sim, px)
    uid = run_workload(w)
    # Another key polling the run: 404, as if it did not exist; nothing forwarded, nothing metered.
    other = httpx.get(f"{px.base}/v3/ai/chat_completion_runs/{uid}",
                      headers={**bearer("bob-1"), "x-request-id": "wl-bob-poll"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"

    truth = httpx.get(f"{sim.base}/_sim/stats").json()
    n = len(w.sent)
    assert truth["requests"] == n          # the 404 never reached the provider
    sim_total = {f: truth["usage"][f] for f in TYPES}   # cache_write: none from the OpenAI flavors
    per_request = ZERO
    for s in w.sent:
        per_request = add(per_request, s.usage)
    assert per_request == sim_total
    assert all(sim_total[f] > 0 for f in TYPES), sim_total

    # The ledger writer runs after each response: wait until every request has its record.
    records = wait_records(px, lambda rs: len(rs) >= n)
    assert len(records) == n, [r["request_id"] for r in records]
    ids = [r["id"] for r in records]
    assert len(set(ids)) == n
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)

    pricing = cfg["pricing"]
    by_rid = {r["request_id"]: r for r in records}
    assert "wl-bob-poll" not in by_rid
    exp_cost = Decimal(0)
    for s in w.sent:
        rec = by_rid[s.rid]
        assert usage_fields(rec) == s.usage, (s.rid, rec, s.usage)
        assert (rec["key"], rec["user"], rec["status"], rec["source"]) == \
            (s.key, KEYS[s.key][0], 200, "provider"), rec
        if s.usage != ZERO:     # the zero-usage async create/poll records may name no model
            assert rec["model"] == s.model, rec
        cost = expected_cost(pricing, s.model, s.usage)
        assert rec["cost_nano"] == to_nano(cost), (s.rid, rec, cost)
        assert rec["cost_usd"] == pytest.approx(float(cost), abs=1e-12)
        exp_cost += cost
    exp_nano = to_nano(exp_cost)
    assert exp_nano > 0

    # Records summed == the simulator.
    rec_total = ZERO
    for r in records:
        rec_total = add(rec_total, usage_fields(r))
    assert rec_total == sim_total
    assert sum(r["cost_nano"] for r in records) == exp_nano

    # /admin/usage total == the simulator, cost exact.
    usage = admin_get(px, "/admin/usage")
    total = usage["total"]
    assert total["requests"] == n
    assert usage_fields(total) == sim_total
    assert total["cost_nano"] == exp_nano
    assert round(Decimal(str(total["cost_usd"])), 6) == round(exp_cost, 6)
    assert total["cost_usd"] == pytest.approx(float(exp_cost), abs=1e-9)

    # group_by=user,key,model: rows sum to the total, and each row is the sum of its records.
    grouped = admin_get(px, "/admin/usage", group_by="user,key,model")
    assert grouped["group_by"] == ["user", "key", "model"]
    assert grouped["total"] == total
    rows_sum = {**ZERO, "requests": 0, "cost_nano": 0}
    expect_rows: dict[tuple[str, str, str], dict[str, int]] = {}
    for r in records:
        cell = expect_rows.setdefault((r["user"], r["key"], r["model"]),
                                      {**ZERO, "requests": 0, "cost_nano": 0})
        for f in (*TYPES, "cost_nano"):
            cell[f] += r[f]
        cell["requests"] += 1
    got_rows = {}
    for row in grouped["rows"]:
        for f in (*TYPES, "requests", "cost_nano"):
            rows_sum[f] += row[f]
        got_rows[(row["user"], row["key"], row["model"])] = {
            f: row[f] for f in (*TYPES, "requests", "cost_nano")}
    assert rows_sum == {**sim_total, "requests": n, "cost_nano": exp_nano}
    assert got_rows == expect_rows
    assert {k[1] for k in got_rows} == {"alice-1", "alice-2", "bob-1", "carol-1"}

    # Prometheus: tokens by type over every label == the simulator; cost; unpriced; requests.
    samples = scrape(px)
    assert tokens_by_type(samples) == sim_total
    assert tokens_by_type(samples, source="provider") == sim_total
    assert tokens_by_type(samples, source="estimated") == ZERO
    assert metric_sum(samples, "meterproxy_cost_usd_total") == pytest.approx(float(exp_cost), abs=1e-9)
    assert metric_sum(samples, "meterproxy_unpriced_requests_total", model=UNPRICED) == 1
    assert metric_sum(samples, "meterproxy_unpriced_requests_total") == 1
    assert metric_sum(samples, "meterproxy_requests_total", status="200") == n
    assert metric_sum(samples, "meterproxy_requests_total", status="404", key="bob-1") == 1
    for key in ("alice-1", "alice-2", "bob-1", "carol-1"):    # and per key, to the token
        want = ZERO
        for s in w.sent:
            if s.key == key:
                want = add(want, s.usage)
        assert tokens_by_type(samples, key=key) == want, key
        assert usage_fields(admin_get(px, "/admin/usage", key=key)["total"]) == want, key

    # The async run: metered once (on the poll that returned the result), charged to carol-1.
    carol = [r for r in records if r["key"] == "carol-1"]
    assert len(carol) == 4
    metered = [r for r in carol if usage_fields(r) != ZERO]
    second_poll = next(s for s in w.sent if s.rid.endswith("async-poll-1"))
    assert len(metered) == 1 and metered[0]["request_id"] == second_poll.rid
    run = second_poll.usage
    assert usage_fields(metered[0]) == run and run["completion_tokens"] > 0
    assert metered[0]["cost_nano"] == to_nano(expected_cost(pricing, "gpt-5.4", run))
    assert not any(r["request_id"] == "wl-bob-poll" for r in records)

    _check_usage_endpoint(px, records)
    _check_cli(px, path, total, store_url)


def _check_usage_endpoint(px: Proc, records: list[dict[str, Any]]) -> None:
    """GET /usage with a client key: the SPEC shape, and its day numbers == the key's ledger."""
    for key in ("alice-1", "carol-1"):
        user = KEYS[key][0]
        r = httpx.get(f"{px.base}/usage", headers=bearer(key))
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"key", "user", "day", "month", "user_day", "user_month", "limits"}
        assert (body["key"], body["user"]) == (key, user)
        spec_fields = {"requests", *TYPES, "cost_usd"}
        for win in ("day", "month", "user_day", "user_month"):
            assert spec_fields <= set(body[win]), body[win]
        key_total = admin_get(px, "/admin/usage", key=key)["total"]
        user_total = admin_get(px, "/admin/usage", user=user)["total"]
        mine = [rec for rec in records if rec["key"] == key]
        assert body["day"]["requests"] == len(mine) == key_total["requests"]
        for f in TYPES:
            assert body["day"][f] == key_total[f] == sum(rec[f] for rec in mine)
            assert body["user_day"][f] == user_total[f]
        assert body["day"]["cost_usd"] == pytest.approx(key_total["cost_usd"], abs=1e-9)
        assert body["user_day"]["requests"] == user_total["requests"]
        # A fresh store: this month so far is today.
        assert body["month"] == body["day"] and body["user_month"] == body["user_day"]
        if key == "alice-1":
            lim = body["limits"]
            assert set(lim) == {"requests", "daily_tokens", "monthly_usd"}
            for v in lim.values():
                assert set(v) == {"limit", "remaining", "reset_s"}
            used = key_total["prompt_tokens"] + key_total["completion_tokens"]
            assert lim["daily_tokens"]["limit"] == ALICE_LIMITS["daily_tokens"]
            assert lim["daily_tokens"]["remaining"] == ALICE_LIMITS["daily_tokens"] - used
            assert lim["monthly_usd"]["remaining"] == pytest.approx(
                ALICE_LIMITS["monthly_usd"] - key_total["cost_usd"], abs=1e-9)
        else:
            assert body["limits"] == {}


def _check_cli(px: Proc, path: Path, total: dict[str, Any], store_url: str | None) -> None:
    """`meterproxy usage` reads the ledger database (whatever the limiter store) and agrees."""
    out = cli_usage(path)
    want = [str(total["requests"]), str(total["prompt_tokens"]), str(total["cached_prompt_tokens"]),
            str(total["cache_write_tokens"]), str(total["completion_tokens"]),
            str(total["reasoning_tokens"]), f"{total['cost_usd']:.6f}"]
    assert total_line(out) == want, out
    assert "alice-1" in out and "carol-1" in out


# --- byte-for-byte streams ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mem(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    """Simulator + proxy on the in-process store, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("metering")
    with simulator() as sim:
        path = write_config(tmp / "config.yaml", make_config(sim.port))
        with proxy(path) as px:
            yield sim, px


# Only these fields differ between two identical requests: the simulator numbers its ids from a
# per-process counter with a random per-process prefix, and stamps `created` with the clock.
_VOLATILE = re.compile(rb'"(id|item_id|created|created_at)":("[^"]*"|\d+)')


def normalise(raw: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":"X"', raw)


STREAMS = [
    ("/v1/chat/completions", {"model": "gpt-5.4", "messages": MSG, "stream": True}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG, "stream": True,
                              "tools": TOOLS, "n": 2}),
    ("/v1/chat/completions", {"model": "o4-mini", "messages": LONG, "stream": True,
                              "stream_options": {"include_usage": False}}),
    ("/v4/beta/chat/completions", {"model": "openai/gpt-4o", "messages": MSG, "stream": True}),
    ("/v3/ai/chat_completion", {"model": "gpt-5.4", "messages": MSG}),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": ["a", "b"], "stream": True, "n": 2}),
    ("/v1/responses", {"model": "gpt-5.4", "input": "Tell me about rivers.", "stream": True}),
]


def _raw_stream(base: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    with httpx.stream("POST", f"{base}{path}", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return b"".join(r.iter_raw())


def _auth(path: str, secret: str) -> dict[str, str]:
    return {"x-api-key": secret} if path.startswith("/v4/") else {"Authorization": f"Bearer {secret}"}


@pytest.mark.parametrize(("path", "body"), STREAMS, ids=[f"{p}:{b['model']}" for p, b in STREAMS])
def test_stream_bytes_identical_to_direct(mem: tuple[Proc, Proc], path: str, body: dict[str, Any]) -> None:
    """The client that did not ask for usage gets exactly the simulator's bytes (ids/created
    aside), although the proxy asked for usage upstream and metered it."""
    sim, px = mem
    before = sim_usage(sim)
    rid = f"bytes-{STREAMS.index((path, body))}"
    via = _raw_stream(px.base, path, body, {**_auth(path, KEYS["bob-1"][1]), "x-request-id": rid})
    truth = {f: sim_usage(sim)[f] - before[f] for f in TYPES}
    upstream_body = httpx.get(f"{sim.base}/_sim/last_request").json()["body"]
    if path == "/v1/responses":
        direct = _raw_stream(sim.base, path, body, _auth(path, "direct"))
        assert b'"usage":{' in via     # the Responses API always carries usage: nothing to strip
    else:
        # The proxy asked for usage upstream; the client gets the provider's answer to that request
        # minus only the usage-only chunk it caused: every other byte ("usage":null too) as sent.
        assert upstream_body["stream_options"]["include_usage"] is True
        injected = {**body, "stream_options": {"include_usage": True}}
        raw = _raw_stream(sim.base, path, injected, _auth(path, "direct"))
        direct = b"".join(ev for ev in re.findall(rb".*?\n\n", raw, re.S) if b'"choices":[],"usage":{' not in ev)
        assert direct != raw and b'"usage":{' not in via
    assert via.count(b"\n\n") > 3
    assert normalise(via) == normalise(direct)
    rec = record_of(px, rid)
    assert usage_fields(rec) == truth and rec["source"] == "provider"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_with_include_usage_gets_usage_chunk(mem: tuple[Proc, Proc], path: str) -> None:
    sim, px = mem
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": LONG} if "chat" in path else {"prompt": "Once upon a time"})
    before = sim_usage(sim)
    rid = "bytes-usage-chat" if "chat" in path else "bytes-usage-legacy"
    via = _raw_stream(px.base, path, body, {**bearer("alice-2"), "x-request-id": rid})
    truth = {f: sim_usage(sim)[f] - before[f] for f in TYPES}
    direct = _raw_stream(sim.base, path, body, {"Authorization": "Bearer direct"})
    assert normalise(via) == normalise(direct)
    events = [e for e in via.split(b"\n\n") if e.startswith(b"data: {")]
    last = json.loads(events[-1][len(b"data: "):])
    assert last["choices"] == [] and _usage_dict(last["usage"]) == {**truth, "cached_prompt_tokens": 0,
                                                                     "reasoning_tokens": 0}
    assert truth["completion_tokens"] > 0
    assert usage_fields(record_of(px, rid)) == truth


# --- estimation -----------------------------------------------------------------------------------

OMIT = [
    ("chat", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": LONG}),
    ("chat-stream-reasoning", "/v1/chat/completions", {"model": "gpt-5.4", "messages": LONG, "stream": True}),
    ("chat-stream-tools", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG,
                                                    "tools": TOOLS, "stream": True}),
    ("v3-stream", "/v3/ai/chat_completion", {"model": "o4-mini", "messages": LONG}),
    ("responses", "/v1/responses", {"model": "gpt-4o-mini", "input": "Tell me about stones.",
                                    "instructions": "Be brief."}),
    ("completions-stream", "/v1/completions", {"model": "gpt-4o-mini", "prompt": "Once upon a time",
                                               "stream": True}),
]


@pytest.mark.parametrize(("name", "path", "body"), OMIT, ids=[o[0] for o in OMIT])
def test_estimated_when_provider_omits_usage(mem: tuple[Proc, Proc], name: str, path: str,
                                             body: dict[str, Any]) -> None:
    sim, px = mem
    before_metric = tokens_by_type(scrape(px), source="estimated")
    before = sim_usage(sim)
    rid = f"omit-{name}"
    r = httpx.post(f"{px.base}{path}", json=body, timeout=30,
                   headers={**bearer("alice-1"), "x-sim-omit-usage": "1", "x-request-id": rid})
    assert r.status_code == 200 and b'"usage"' not in r.content
    truth = {f: sim_usage(sim)[f] - before[f] for f in TYPES}
    assert truth["prompt_tokens"] > 0 and truth["completion_tokens"] > 0   # the work was done
    rec = record_of(px, rid)
    assert rec["source"] == "estimated"
    assert abs(rec["prompt_tokens"] - truth["prompt_tokens"]) <= 0.05 * truth["prompt_tokens"], (rec, truth)
    if "tools" not in body:
        # SPEC counts tool-call *argument* deltas; the simulator (like OpenAI) also bills the
        # function name, so a short tool call is under-estimated by the name's tokens (2 of 13
        # here). The total is still within 5%, which is what issue #3 asks.
        assert abs(rec["completion_tokens"] - truth["completion_tokens"]) \
            <= 0.05 * truth["completion_tokens"], (rec, truth)
    est, true_total = rec["prompt_tokens"] + rec["completion_tokens"], \
        truth["prompt_tokens"] + truth["completion_tokens"]
    assert abs(est - true_total) <= 0.05 * true_total
    after_metric = tokens_by_type(scrape(px), source="estimated")
    assert after_metric["prompt_tokens"] - before_metric["prompt_tokens"] == rec["prompt_tokens"]
    assert after_metric["completion_tokens"] - before_metric["completion_tokens"] == rec["completion_tokens"]


# --- broken streams and clients that leave --------------------------------------------------------

def test_mid_stream_break_is_metered(mem: tuple[Proc, Proc]) -> None:
    sim, px = mem
    body = {"model": "gpt-4o-mini", "messages": LONG, "stream": True}
    prompt_truth = _prompt_truth(sim, body)
    h = {**bearer("bob-1"), "x-sim-break-after": "3", "x-request-id": "break-3"}
    with httpx.stream("POST", f"{px.base}/v1/chat/completions", json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200
        raw = b""
        # The provider broke the stream, so the client's is cut too (no final chunk): the client
        # must not mistake the partial answer for a whole one.
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            for part in r.iter_raw():
                raw += part
    assert raw.count(b"data: {") == 3 and b"[DONE]" not in raw
    rec = record_of(px, "break-3")
    assert rec["source"] == "estimated" and rec["key"] == "bob-1"
    assert rec["prompt_tokens"] == prompt_truth
    # Three events went out: the role chunk and two one-token words.
    assert rec["completion_tokens"] == 2
    assert rec["cost_nano"] == to_nano(expected_cost(
        make_config(0)["pricing"], "gpt-4o-mini", {**ZERO, "prompt_tokens": prompt_truth,
                                                   "completion_tokens": 2}))


def test_client_disconnect_mid_stream_is_metered(mem: tuple[Proc, Proc]) -> None:
    sim, px = mem
    body = {"model": "gpt-5.4", "messages": LONG, "stream": True}
    prompt_truth = _prompt_truth(sim, body)
    before = httpx.get(f"{sim.base}/_sim/stats").json()["cancelled_streams"]
    h = {**bearer("carol-1"), "x-sim-chunk-delay-ms": "50", "x-sim-chunks": "400",
         "x-request-id": "gone-1"}
    with httpx.stream("POST", f"{px.base}/v1/chat/completions", json=body, headers=h, timeout=30) as r:
        first = next(r.iter_raw())
    assert first.startswith(b"data: {")
    rec = record_of(px, "gone-1")
    assert rec["status"] == 499 and rec["source"] == "estimated" and rec["key"] == "carol-1"
    assert rec["prompt_tokens"] == prompt_truth
    assert rec["completion_tokens"] < 400
    # And the provider's stream was closed (promptness itself is test_proxy_core's business).
    deadline = time.monotonic() + 5
    while httpx.get(f"{sim.base}/_sim/stats").json()["cancelled_streams"] == before:
        assert time.monotonic() < deadline, "the provider's stream was never cancelled"
        time.sleep(0.02)


def _prompt_truth(sim: Proc, body: dict[str, Any]) -> int:
    """The simulator's prompt count for `body`, asked of it directly (non-stream)."""
    r = httpx.post(f"{sim.base}/v1/chat/completions", json={**body, "stream": False},
                   headers={"Authorization": "Bearer direct"})
    n: int = r.json()["usage"]["prompt_tokens"]
    return n
