"""Issue #7, security: no secret in logs, responses or metrics; admin and metrics guarded; runs
private to their key; client x-forwarded-* trusted for nothing.

Real processes: simulator, proxy, a redis-server that requires a password (so the store URL
carries a credential too) and a PostgreSQL ledger whose URL carries a password, both taken down
for a moment mid-run so that error paths log.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.cluster import ADMIN_KEY, KEYS, PROVIDER_SECRETS, bearer, make_config, proxy, write_config
from tests.e2e.load import ADMIN, MSG, metric_in, mixed_shapes, run_load, wait_for
from tests.procs import PostgresServer, Proc, RedisServer, free_port, simulator

CHAT = "/v1/chat/completions"
REDIS_PASSWORD = "redis-pw-0d7c4e9b1f"
PG_PASSWORD = "pg-pw-8e2a61c4d9b3"     # in the ledger URL (the test server trusts loopback anyway)
STRANGER_KEY = "mp-guessed-key-5a1e"      # what an attacker tries: must not be echoed into logs either


def _secrets() -> list[str]:
    return [s for _, s in KEYS.values()] + [ADMIN_KEY, *PROVIDER_SECRETS, REDIS_PASSWORD, PG_PASSWORD,
                                             STRANGER_KEY]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, list[str]]]:
    """A full mixed run against one proxy at DEBUG log level; yields (sim, proxy, everything the
    clients received: status lines, headers and bodies, plus /metrics)."""
    tmp = tmp_path_factory.mktemp("security")
    rs = RedisServer(extra=["--requirepass", REDIS_PASSWORD]).start()
    pg = PostgresServer().start()
    seen: list[str] = []
    try:
        with simulator() as sim:
            url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{rs.port}/0"
            cfg = make_config(sim.port, store_url=url, keys={"carol-1": {"models": ["gpt-4o-mini"]},
                                                             "bob-1": {"limits": {"rpm": 5}}},
                              ledger={"url": pg.new_database().replace("postgres@", f"postgres:{PG_PASSWORD}@")})
            cfg["providers"]["refused"] = {"base_url": f"http://127.0.0.1:{free_port()}", "paths": ["/refused/"],
                                           "auth": {"header": "Authorization", "value": "Bearer ${SIM_OPENAI_KEY}"}}
            path = write_config(tmp / "c.yaml", cfg)
            with proxy(path, env={"METERPROXY_LOG_LEVEL": "DEBUG"}) as px:
                _exercise(px, rs, pg, seen)
                yield sim, px, seen
    finally:
        rs.cleanup()
        pg.cleanup()


def _keep(seen: list[str], r: httpx.Response) -> httpx.Response:
    seen.append(f"{r.status_code} {r.headers.raw!r} {r.text}")
    return r


def _exercise(px: Proc, rs: RedisServer, pg: PostgresServer, seen: list[str]) -> None:
    """Everything a busy day holds: every flavor and key, refusals, provider errors, unreachable
    provider, broken streams, clients leaving, async runs, the admin API, a store outage."""
    results = asyncio.run(run_load([px.base], 180, 20, mixed_shapes(chunks=4), prefix="sec"))
    seen += [f"{r.status} {r.body.decode(errors='replace')}" for _, r in results]
    b = px.base
    with httpx.Client(timeout=30) as c:
        body = {"model": "gpt-5.4", "messages": MSG}
        for headers in ({"Authorization": f"Bearer {STRANGER_KEY}"}, {"x-api-key": STRANGER_KEY},
                        {**bearer("alice-1"), "x-api-key": KEYS["bob-1"][1]},
                        {"Authorization": f"Bearer {PROVIDER_SECRETS[0]}"}, {"Authorization": f"Bearer {ADMIN_KEY}"},
                        {"Authorization": f"Basic {KEYS['alice-1'][1]}"}, {}):
            assert _keep(seen, c.post(b + CHAT, json=body, headers=headers)).status_code == 401
        assert _keep(seen, c.post(b + CHAT, json=body, headers=bearer("carol-1"))).status_code == 403
        for status in ("500", "429", "401"):
            _keep(seen, c.post(b + CHAT, json=body, headers={**bearer("alice-1"), "x-sim-status": status}))
        assert _keep(seen, c.post(b + "/refused" + CHAT, json=body, headers=bearer("alice-1"))).status_code == 502
        with c.stream("POST", b + CHAT, json={**body, "stream": True},
                      headers={**bearer("alice-2"), "x-sim-break-after": "3"}) as r:
            got = b""
            with pytest.raises(httpx.RemoteProtocolError):   # the provider broke it: so does the proxy
                for part in r.iter_raw():
                    got += part
            seen.append(f"{r.status_code} {got.decode(errors='replace')}")
        _keep(seen, c.post(b + CHAT, content=b"{nope", headers=bearer("alice-1")))
        for _ in range(7):                                   # bob-1: rpm 5 → 429s
            _keep(seen, c.post(b + CHAT, json=body, headers=bearer("bob-1")))
        with c.stream("POST", b + CHAT, json={**body, "stream": True},
                      headers={**bearer("alice-1"), "x-sim-chunks": "200", "x-sim-chunk-delay-ms": "20"}) as r:
            next(r.iter_raw())                                # and leave
        run = _keep(seen, c.post(b + "/v3/ai/chat_completion", headers=bearer("alice-1"),
                                 json={**body, "async": True, "stream": False})).json()["uid"]
        for key in ("alice-1", "alice-1", "bob-1"):
            _keep(seen, c.get(f"{b}/v3/ai/chat_completion_runs/{run}", headers=bearer(key)))
        for key in KEYS:
            _keep(seen, c.get(b + "/usage", headers=bearer(key)))
        _keep(seen, c.get(b + "/admin/usage?group_by=user,key,model", headers=ADMIN))
        _keep(seen, c.get(b + "/admin/usage/records?limit=50", headers=ADMIN))
        _keep(seen, c.get(b + "/admin/usage", headers=bearer("alice-1")))
        # The stores go away for a moment: error paths log (store, ledger, readiness).
        rs.stop()
        pg.stop("immediate")
        for _ in range(5):
            _keep(seen, c.post(b + CHAT, json=body, headers=bearer("alice-2")))
        _keep(seen, c.get(b + "/readyz"))
        _keep(seen, c.get(b + "/usage", headers=bearer("alice-2")))
        rs.start()
        pg.start()
        wait_for(lambda: metric_in(c.get(b + "/metrics").text, "meterproxy_usage_backlog") == 0, 20,
                 "the backlog to drain")
        _keep(seen, c.get(b + "/metrics"))
        _keep(seen, c.get(b + "/readyz"))


def test_no_secret_in_logs(full_run: tuple[Proc, Proc, list[str]]) -> None:
    _, px, _ = full_run
    log = px.output()
    # The run really logged its error paths (else the grep below proves little).
    assert "store unavailable" in log and "ledger write" in log, log[-2000:]
    leaked = [s for s in _secrets() if s in log]
    assert leaked == [], leaked
    # Nor in any recognisable fragment: no 12-character window of any secret.
    for s in _secrets():
        for i in range(len(s) - 11):
            assert s[i:i + 12] not in log, (s, s[i:i + 12])


def test_no_provider_or_store_credential_in_answers_or_metrics(full_run: tuple[Proc, Proc, list[str]]) -> None:
    _, _, seen = full_run
    text = "\n".join(seen)
    assert len(seen) > 200 and "meterproxy_requests_total" in text   # /metrics is in there
    for s in (*PROVIDER_SECRETS, REDIS_PASSWORD, PG_PASSWORD, ADMIN_KEY):
        assert s not in text, s
    # Client keys never come back either, not even to their owner.
    for _, s in KEYS.values():
        assert s not in text


def test_async_run_is_private_to_its_key(full_run: tuple[Proc, Proc, list[str]]) -> None:
    _, px, _ = full_run
    h = bearer("alice-1")
    uid = httpx.post(px.base + "/v3/ai/chat_completion", headers=h,
                     json={"model": "gpt-5.4", "messages": MSG, "async": True, "stream": False}).json()["uid"]
    poll = f"{px.base}/v3/ai/chat_completion_runs/{uid}"
    # Another key — of another user, or of the same user — gets 404, as for a run that does not exist.
    for other in ("bob-1", "alice-2", "carol-1"):
        r = httpx.get(poll, headers=bearer(other))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (other, r.text)
        assert uid not in r.text
    missing = httpx.get(f"{px.base}/v3/ai/chat_completion_runs/no-such-run", headers=h)
    assert missing.status_code == 404 and missing.json() == r.json()      # indistinguishable
    assert httpx.get(poll, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 401
    statuses = [httpx.get(poll, headers=h).json()["status"] for _ in range(2)]
    assert statuses[-1] == "completed"


@pytest.mark.parametrize("path", ["/admin/usage", "/admin/usage/records", "/admin/usage?group_by=user"])
def test_admin_refuses_every_client_key(full_run: tuple[Proc, Proc, list[str]], path: str) -> None:
    _, px, _ = full_run
    for key_id in KEYS:
        for headers in (bearer(key_id), {"x-api-key": KEYS[key_id][1]}):
            r = httpx.get(px.base + path, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required", (key_id, r.text)
            assert '"rows"' not in r.text and '"records"' not in r.text
    for headers in ({}, {"Authorization": f"Bearer {PROVIDER_SECRETS[0]}"}, {"x-api-key": STRANGER_KEY},
                    {"Authorization": f"Bearer {ADMIN_KEY}", "x-api-key": KEYS["alice-1"][1]},
                    {"x-forwarded-for": "127.0.0.1", "x-real-ip": "127.0.0.1"}):
        assert httpx.get(px.base + path, headers=headers).status_code == 401, headers
    assert httpx.get(px.base + path, headers=ADMIN).status_code == 200
    assert httpx.get(px.base + path, headers={"x-api-key": ADMIN_KEY}).status_code == 200


def test_client_forwarded_headers_are_not_trusted(full_run: tuple[Proc, Proc, list[str]]) -> None:
    """x-forwarded-for/-host/-proto, Forwarded and x-real-ip from a client change nothing: the
    upstream host and path are the provider's, the real peer is appended to the XFF chain (never
    replaced by the client's claim), and no claimed address grants anything."""
    sim, px, _ = full_run
    spoof = {"x-forwarded-for": "10.0.0.1", "x-forwarded-host": "evil.example", "x-forwarded-proto": "https",
             "x-forwarded-prefix": "/admin", "forwarded": "for=127.0.0.1;host=evil.example", "x-real-ip": "127.0.0.1"}
    r = httpx.post(px.base + CHAT, headers={**bearer("alice-1"), **spoof}, json={"model": "gpt-5.4", "messages": MSG})
    assert r.status_code == 200
    seen = httpx.get(f"{sim.base}/_sim/last_request").json()
    assert seen["path"] == CHAT and seen["headers"]["host"] == f"127.0.0.1:{sim.port}"
    assert seen["headers"]["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    # A spoofed loopback address gets no key-less access, and no other key's usage.
    assert httpx.post(px.base + CHAT, headers=spoof, json={"model": "gpt-5.4", "messages": MSG}).status_code == 401
    mine = httpx.get(px.base + "/usage", headers={**bearer("alice-1"), **spoof}).json()
    assert mine["key"] == "alice-1"


# --- /metrics placement and protection --------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, int]]:
    port = free_port()
    with simulator() as sim:
        cfg = make_config(sim.port, server={"metrics_port": port, "metrics_require_admin": True})
        with proxy(write_config(tmp_path_factory.mktemp("metrics") / "c.yaml", cfg)) as px:
            assert httpx.post(px.base + CHAT, headers=bearer("alice-1"),
                              json={"model": "gpt-5.4", "messages": MSG}).status_code == 200
            yield px, port


def test_metrics_on_separate_listener(guarded_metrics: tuple[Proc, int]) -> None:
    _px, port = guarded_metrics
    deadline = time.monotonic() + 5
    while True:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/metrics")
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert r.status_code == 200
    assert metric_in(r.text, "meterproxy_requests_total", {"key": "alice-1", "status": "200"}) == 1
    for s in (*PROVIDER_SECRETS, ADMIN_KEY, *(s for _, s in KEYS.values())):
        assert s not in r.text
    # Bound to metrics_host (127.0.0.1 by default), not to every interface.
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex((_non_loopback_ip(), port)) != 0 or _non_loopback_ip() == "127.0.0.1"


def _non_loopback_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))     # no packet is sent; picks the outbound interface
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def test_metrics_require_admin_on_main_listener(guarded_metrics: tuple[Proc, int]) -> None:
    px, _ = guarded_metrics
    assert httpx.get(f"{px.base}/metrics").status_code == 403
    for key_id in KEYS:
        r = httpx.get(f"{px.base}/metrics", headers=bearer(key_id))
        assert r.status_code == 403 and "meterproxy_" not in r.text
    r = httpx.get(f"{px.base}/metrics", headers=ADMIN)
    assert r.status_code == 200 and "meterproxy_requests_total" in r.text
