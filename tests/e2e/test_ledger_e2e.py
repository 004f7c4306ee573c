"""Issue #10 end to end: the SQL ledger behind real proxy processes.

Default config (SQLite beside the config file, in-process limiter): usage and budgets survive a
restart; `meterproxy usage`, `usage export` and `ledger migrate` read the same database; hostile
admin inputs answer 400; `ledger.migrate: manual` refuses an old schema; the cloudevents exporter
delivers every record once, in order, across a restart. Clients are the official openai SDK.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from meterproxy.ledger import open_ledger_store
from tests.e2e.cluster import ADMIN_KEY, ENV, KEYS, bearer, make_config, proxy, write_config
from tests.e2e.receiver import Receiver
from tests.procs import ROOT, Proc, RedisServer, free_port, simulator

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG: list[Any] = [{"role": "user", "content": "Tell me about rivers and stones."}]
BUDGET_USD = 0.001   # about three small gpt-5.4 answers


@pytest.fixture(scope="module")
def sim() -> Iterator[Proc]:
    with simulator() as s:
        yield s


def sdk(px: Proc, key_id: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{px.base}/v1", api_key=KEYS[key_id][1], max_retries=0)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterproxy", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={**ENV, "PATH": "/usr/bin:/bin"})


def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def records(px: Proc) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    since = ""
    while True:
        body = httpx.get(f"{px.base}/admin/usage/records", params={"since_id": since, "limit": "50"},
                         headers=ADMIN, timeout=10).json()
        if not body["records"]:
            return out
        out += body["records"]
        since = body["next_since_id"]


def snapshot(px: Proc, config: Path) -> dict[str, Any]:
    """What a restart must not change: /usage windows, /admin/usage, the CLI table, the budget."""
    snap: dict[str, Any] = {}
    for key in ("alice-1", "bob-1"):
        u = httpx.get(f"{px.base}/usage", headers=bearer(key), timeout=10).json()
        snap[key] = {w: u[w] for w in ("day", "month", "user_day", "user_month")}
        snap[key + ":budget"] = u["limits"].get("monthly_usd", {}).get("remaining")
    snap["admin"] = httpx.get(f"{px.base}/admin/usage", params={"group_by": "user,key,model,day"},
                              headers=ADMIN, timeout=10).json()
    r = cli(config, "usage", "--group-by", "user,key")
    assert r.returncode == 0, r.stderr
    snap["cli"] = r.stdout
    return snap


def test_restart_keeps_usage_and_budgets(sim: Proc, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", make_config(
        sim.port, keys={"bob-1": {"limits": {"monthly_usd": BUDGET_USD}}}))
    with proxy(cfg) as px:
        for i in range(4):
            sdk(px, "alice-1").chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=20)
            stream = sdk(px, "alice-2").chat.completions.create(
                model="gpt-5.4", messages=MSG, max_tokens=10 + i, stream=True)
            for _ in stream:
                pass
        bob = 0
        for _ in range(10):   # bob spends his monthly budget
            try:
                sdk(px, "bob-1").chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=40)
                bob += 1
            except openai.RateLimitError as exc:
                assert exc.code == "insufficient_quota"
                break
        else:
            pytest.fail("the budget never bit")
        assert bob >= 2
        until(lambda: len(records(px)) == 8 + bob, 5, "records written")
        n = len(records(px))
        before = snapshot(px, cfg)
    assert (tmp_path / "meterproxy-ledger.db").is_file()   # the default: beside the config
    with proxy(cfg) as px:
        after = snapshot(px, cfg)
        assert after == before
        assert before["admin"]["total"]["requests"] == n and before["bob-1:budget"] == 0
        with pytest.raises(openai.RateLimitError) as err:   # still spent after the restart
            sdk(px, "bob-1").chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=5)
        assert err.value.code == "insufficient_quota"
        assert httpx.get(f"{px.base}/readyz", timeout=5).status_code == 200


def test_cli_export_and_migrate(sim: Proc, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", make_config(sim.port))
    r = cli(cfg, "usage")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no ledger at" in r.stderr
    with proxy(cfg) as px:
        for i in range(5):
            sdk(px, "carol-1").chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=5 + i)
        until(lambda: len(records(px)) == 5, 5, "records written")
        recs = records(px)
    r = cli(cfg, "usage", "export", "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines == recs
    r = cli(cfg, "usage", "export", "--format", "csv", "--since", "2000-01-01")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["id"] for row in rows] == [x["id"] for x in recs]
    assert [int(row["prompt_tokens"]) for row in rows] == [x["prompt_tokens"] for x in recs]
    r = cli(cfg, "usage", "export", "--until", "2000-01-01")
    assert r.returncode == 0 and r.stdout == ""
    r = cli(cfg, "ledger", "migrate")
    assert r.returncode == 0 and "schema at version 2" in r.stdout, r.stderr
    for args, code in ((["usage", "--since", "yesterday"], 2), (["usage", "--group-by", "colour"], 2),
                       (["usage", "export", "--since", "9999-12-31T23:00:00-05:00"], 2)):
        r = cli(cfg, *args)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "meterproxy", "usage"], capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert r.returncode == 2 and r.stderr.strip() == "meterproxy usage: --config FILE is required"
    r = cli(tmp_path / "missing.yaml", "usage")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


HOSTILE = [
    ("/admin/usage", {"until": "9999-12-31"}),
    ("/admin/usage", {"since": "0001-01-01T00:00:00+01:00"}),
    ("/admin/usage", {"since": "0001-01-01T00:00:01"}),
    ("/admin/usage", {"since": "2026-01-01", "until": "9999-12-31T23:59:59-05:00"}),
    ("/admin/usage/records", {"since_id": "99999999999999999999"}),
    ("/admin/usage/records", {"since_id": "9223372036854775808"}),
    ("/admin/usage/records", {"since_id": "-1"}),
]


def test_hostile_admin_inputs_answer_400(sim: Proc, tmp_path: Path) -> None:
    """Issue 14: these answered 500 or 503 (and were counted as store errors)."""
    cfg = write_config(tmp_path / "c.yaml", make_config(sim.port))
    with proxy(cfg) as px:
        for path, params in HOSTILE:
            r = httpx.get(f"{px.base}{path}", params=params, headers=ADMIN, timeout=10)
            assert r.status_code == 400, (path, params, r.text)
            assert r.json()["error"]["code"] is not None or r.json()["error"]["type"] == "invalid_request_error"
        metrics = httpx.get(f"{px.base}/metrics", timeout=5).text
        assert "meterproxy_store_errors_total{" not in metrics
        ok = httpx.get(f"{px.base}/admin/usage/records", params={"since_id": "9223372036854775807"},
                       headers=ADMIN, timeout=10)
        assert ok.status_code == 200 and ok.json()["records"] == []


def test_manual_migrate_refuses_an_old_schema(sim: Proc, tmp_path: Path) -> None:
    db = tmp_path / "old.db"

    async def make_v1() -> None:
        store = open_ledger_store(f"sqlite://{db}")
        await store.migrate(target=1)
        await store.close()

    asyncio.run(make_v1())
    cfg = write_config(tmp_path / "c.yaml", make_config(
        sim.port, ledger={"url": f"sqlite://{db}", "migrate": "manual"}))
    port = free_port()
    p = Proc(["serve", "--config", str(cfg), "--port", str(port)], port, env=ENV)
    assert p.proc.wait(30) != 0
    assert "meterproxy ledger migrate --config FILE" in p.output()
    r = cli(cfg, "ledger", "migrate")
    assert r.returncode == 0 and "version 2" in r.stdout
    with proxy(cfg) as px:
        assert httpx.get(f"{px.base}/readyz", timeout=5).status_code == 200


def test_cloudevents_exporter_delivers_every_record_in_order(sim: Proc, tmp_path: Path) -> None:
    rx = Receiver(fail=2)   # the first two POSTs fail: retried with backoff
    cfg = write_config(tmp_path / "c.yaml", make_config(sim.port, ledger={"export": [
        {"type": "cloudevents", "url": rx.url, "headers": {"Authorization": "Bearer t"},
         "batch_size": 3}]}))
    try:
        with proxy(cfg) as px:
            for i in range(7):
                sdk(px, "alice-1").chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=3 + i)
            until(lambda: len(rx.events) >= 7, 15, "events delivered")
            until(lambda: 'meterproxy_export_pending{exporter="cloudevents"} 0.0' in
                  httpx.get(f"{px.base}/metrics", timeout=5).text, 5, "pending gauge at 0")
        with proxy(cfg) as px:   # a restart resumes from the cursor in the ledger
            for _ in range(3):
                sdk(px, "bob-1").chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=3)
            until(lambda: len(rx.events) >= 10, 15, "events after the restart")
            recs = records(px)
        ids = [e["id"] for e in rx.events]
        assert ids == [r["id"] for r in recs]   # each once, in record order
        assert rx.content_types == {"application/cloudevents-batch+json"}
        e = rx.events[0]
        assert (e["specversion"], e["type"], e["subject"]) == ("1.0", "com.meterproxy.usage", "alice")
        assert e["data"] == recs[0] and e["time"].startswith("20")
        assert max(len(b) for b in rx.batches) <= 3
    finally:
        rx.close()


def test_usage_served_during_a_redis_outage_is_charged_when_it_is_back(sim: Proc, tmp_path: Path) -> None:
    """on_error: open serves while Redis is down, unadmitted; once Redis is back, that usage is
    charged to the budget counters, so a budget spent during the outage is spent after it."""
    rs = RedisServer(extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        cfg = write_config(tmp_path / "c.yaml", make_config(
            sim.port, store_url=rs.url, on_error="open",
            keys={"bob-1": {"limits": {"monthly_usd": BUDGET_USD}}}))
        with proxy(cfg) as px:
            bob = sdk(px, "bob-1")
            bob.chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=5)   # Redis up
            rs.stop()
            for _ in range(6):   # about twice the budget, served open
                bob.chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=40)
            rs.start()

            def spent() -> bool:
                u = httpx.get(f"{px.base}/usage", headers=bearer("bob-1"), timeout=5)
                return u.status_code == 200 and u.json()["limits"]["monthly_usd"]["remaining"] == 0
            until(spent, 10, "outage usage charged to the budget")
            with pytest.raises(openai.RateLimitError) as err:
                bob.chat.completions.create(model="gpt-5.4", messages=MSG, max_tokens=5)
            assert err.value.code == "insufficient_quota"
            assert "charged to budgets" in px.output()
    finally:
        rs.cleanup()
