"""Logs (docs/operations.md "Logs"): the startup line and exactly one access line per proxied
request, in a real proxy process after a mixed run; no key or credential in any line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterproxy import logs
from tests.e2e.cluster import ADMIN_KEY, KEYS, PROVIDER_SECRETS, bearer, make_config, proxy, write_config
from tests.procs import Proc, free_port, simulator

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hello there"}]


def _run(px: Proc) -> list[tuple[str, int]]:
    """A mixed run; returns (request id, status) of every request sent to a provider path."""
    sent: list[tuple[str, int]] = []
    with httpx.Client(base_url=px.base, timeout=30) as c:
        def go(method: str, path: str, headers: dict[str, str], rid: str, **kw: Any) -> None:
            r = c.request(method, path, headers={**headers, "x-request-id": rid}, **kw)
            sent.append((rid, r.status_code))

        go("POST", CHAT, bearer("alice-1"), "r-json", json={"model": "gpt-5.4", "messages": MSG})
        go("POST", CHAT, bearer("alice-2"), "r-stream", json={"model": "gpt-5.4", "messages": MSG, "stream": True})
        go("POST", "/v4/beta/chat/completions", {"x-api-key": KEYS["bob-1"][1]}, "r-vendor",
           json={"model": "openai/gpt-4o", "messages": MSG})
        go("GET", "/v1/models", bearer("alice-1"), "r-pass")
        go("POST", CHAT, {"Authorization": "Bearer mp-wrong-key"}, "r-401", json={"model": "gpt-5.4", "messages": MSG})
        go("POST", CHAT, bearer("carol-1"), "r-403", json={"model": "gpt-5.4", "messages": MSG})
        go("POST", CHAT, bearer("alice-1"), "r-400", content=b"{not json")
        go("POST", "/nowhere/x", bearer("alice-1"), "r-404", json={})
        go("POST", "/refused/v1/chat/completions", bearer("alice-1"), "r-502",
           json={"model": "gpt-5.4", "messages": MSG})
        for i in range(3):  # bob-1: rpm 2, the third is refused
            go("POST", CHAT, bearer("bob-1"), f"r-rpm-{i}", json={"model": "gpt-5.4", "messages": MSG})
        # Not provider paths: no access line for these.
        assert c.get("/usage", headers=bearer("alice-1")).status_code == 200
        assert c.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
        assert c.get("/healthz").status_code == 200
    return sent


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    tmp: Path = tmp_path_factory.mktemp("logs")
    with simulator() as sim:
        cfg = make_config(sim.port, server={"log_format": "json"},
                          keys={"carol-1": {"models": ["gpt-4o-mini"]}, "bob-1": {"limits": {"rpm": 2}}})
        cfg["providers"]["refused"] = {"base_url": f"http://127.0.0.1:{free_port()}", "paths": ["/refused/"],
                                       "auth": {"header": "Authorization", "value": "Bearer ${SIM_OPENAI_KEY}"}}
        path = write_config(tmp / "c.yaml", cfg)
        with proxy(path) as px:
            sent = _run(px)
        assert px.proc.returncode == 0
        yield px.output(), sent


def test_one_access_line_per_request(logged: tuple[str, list[tuple[str, int]]]) -> None:
    out, sent = logged
    docs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [d for d in docs if d["logger"] == "meterproxy.access"]
    assert sorted((d["request_id"], d["status"]) for d in access) == sorted(sent)
    assert {s for _, s in sent} >= {200, 400, 401, 403, 404, 429, 502}
    assert all(set(logs.ACCESS_FIELDS) <= set(d) and d["msg"] == "access" for d in access)
    by_id = {d["request_id"]: d for d in access}
    ok = by_id["r-stream"]
    assert (ok["key"], ok["user"], ok["provider"], ok["model"], ok["source"]) == (
        "alice-2", "alice", "sim", "gpt-5.4", "provider")
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] > 0 and float(ok["cost_usd"]) > 0
    assert by_id["r-401"]["key"] == "-" and by_id["r-403"]["key"] == "carol-1"


def test_startup_and_upstream_failure_lines(logged: tuple[str, list[tuple[str, int]]]) -> None:
    out, _ = logged
    docs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    [start] = [d["msg"] for d in docs if "listening on" in d["msg"]]
    assert "limiter store: in-process" in start and "sim=127.0.0.1:" in start and "refused=" in start
    [fail] = [d["msg"] for d in docs if d["msg"].startswith("upstream ")]
    assert "provider refused" in fail and "host 127.0.0.1:" in fail and "r-502" in fail


def test_no_secret_in_the_log(logged: tuple[str, list[tuple[str, int]]]) -> None:
    out, _ = logged
    secrets = [s for _, s in KEYS.values()] + [ADMIN_KEY, "mp-wrong-key", *PROVIDER_SECRETS]
    assert [s for s in secrets if s in out] == []


def test_text_line_stays_one_line() -> None:
    record = logging.LogRecord("meterproxy.access", logging.INFO, __file__, 1, "access", None, None)
    record.access = ("r 1", "k", "u", "p", 'evil"\nFAKE line', 200, "provider", 1, 2, "0.000000001", 3, 4)
    line = logs.TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith('request_id="r 1" key=k user=u provider=p model="evil\\"\\nFAKE line" status=200 '
                         "source=provider prompt_tokens=1 completion_tokens=2 cost_usd=0.000000001 "
                         "duration_ms=3 bytes_in=4")
