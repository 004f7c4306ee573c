"""Issue #2 end to end: real simulator and proxy processes over loopback sockets."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.cluster import (
    ADMIN_KEY,
    KEYS,
    PROVIDER_SECRETS,
    bearer,
    make_config,
    proxy,
    stack,
    write_config,
)
from tests.procs import free_port, simulator

MSG = [{"role": "user", "content": "Tell me about rivers and stones."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("core")
    keys = {"carol-1": {"models": ["gpt-4o-mini", "openai/*"]}}
    with stack(tmp, keys=keys, server={"max_body_bytes": 65536}) as s:
        yield s


def _sdk(base: str, key_id: str = "alice-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[key_id][1], max_retries=0)


def test_sdk_non_stream_matches_provider(core) -> None:  # type: ignore[no-untyped-def]
    sim, px, _ = core
    via = _sdk(px.base).chat.completions.create(model="gpt-5.4", messages=MSG)  # type: ignore[arg-type]
    direct = openai.OpenAI(base_url=f"{sim.base}/v1", api_key="x").chat.completions.create(
        model="gpt-5.4", messages=MSG)  # type: ignore[arg-type]
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.choices[0].message.content
    assert via.usage is not None and direct.usage is not None
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens


def test_sdk_stream_tools_and_n2(core) -> None:  # type: ignore[no-untyped-def]
    sim, px, _ = core
    client = _sdk(px.base)
    direct = openai.OpenAI(base_url=f"{sim.base}/v1", api_key="x")

    def collect(c: openai.OpenAI, **kw: object) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in c.chat.completions.create(model="gpt-5.4", messages=MSG, stream=True, **kw):  # type: ignore[call-overload]
            for ch in chunk.choices:
                piece = ch.delta.content or ""
                for tc in ch.delta.tool_calls or []:
                    piece += (tc.function.arguments or "") if tc.function else ""
                out[ch.index] = out.get(ch.index, "") + piece
        return out

    plain = collect(client)
    assert plain == collect(direct) and plain[0]
    two = collect(client, n=2)
    assert set(two) == {0, 1} and two == collect(direct, n=2)
    tools = collect(client, tools=TOOLS)
    assert json.loads(tools[0]) == json.loads(collect(direct, tools=TOOLS)[0])
    # A client that did not ask for usage sees no usage chunk (the proxy asked for it upstream).
    chunks = list(client.chat.completions.create(model="gpt-5.4", messages=MSG, stream=True))  # type: ignore[arg-type]
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    asked = list(client.chat.completions.create(model="gpt-5.4", messages=MSG, stream=True,  # type: ignore[arg-type]
                                                stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].choices == []


def test_sdk_raises_when_the_provider_breaks_the_stream(core) -> None:  # type: ignore[no-untyped-def]
    """The provider drops the connection after 3 events: the SDK client must get an error, not a
    silently shorter answer that looks complete (the proxy cuts the client's stream the same way)."""
    _, px, _ = core
    client = openai.OpenAI(base_url=f"{px.base}/v1", api_key=KEYS["alice-1"][1], max_retries=0,
                           default_headers={"x-sim-break-after": "3", "x-sim-chunk-delay-ms": "30"})
    chunks = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True):  # type: ignore[arg-type]
            chunks.append(chunk)
    assert len(chunks) == 3  # what came before the break was delivered first


def test_vendor_flavor_x_api_key(core) -> None:  # type: ignore[no-untyped-def]
    sim, px, _ = core
    body = {"model": "openai/gpt-4o", "messages": MSG}
    r = httpx.post(f"{px.base}/v4/beta/chat/completions", json=body,
                   headers={"x-api-key": KEYS["bob-1"][1]})
    assert r.status_code == 200, r.text
    seen = httpx.get(f"{sim.base}/_sim/last_request").json()
    assert seen["headers"]["x-api-key"] == PROVIDER_SECRETS[1]
    d = httpx.post(f"{sim.base}/v4/beta/chat/completions", json=body, headers={"x-api-key": "v"})
    assert r.json()["choices"] == d.json()["choices"]


def test_runs_flavor_streams_by_default_and_async(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    h = bearer("alice-1")
    with httpx.stream("POST", f"{px.base}/v3/ai/chat_completion", headers=h,
                      json={"model": "gpt-5.4", "messages": MSG}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert "data: [DONE]" in text and '"usage":{' not in text
    r = httpx.post(f"{px.base}/v3/ai/chat_completion", headers=h,
                   json={"model": "gpt-5.4", "messages": MSG, "async": True, "stream": False})
    uid = r.json()["uid"]
    poll = f"{px.base}/v3/ai/chat_completion_runs/{uid}"
    statuses = [httpx.get(poll, headers=h).json()["status"] for _ in range(3)]
    assert statuses[-1] == "completed"
    other = httpx.get(poll, headers=bearer("bob-1"))
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"


def test_streaming_is_not_buffered(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    h = {**bearer("alice-1"), "x-sim-chunk-delay-ms": "200", "x-sim-chunks": "8"}
    t0 = time.monotonic()
    arrivals: list[float] = []
    with httpx.stream("POST", f"{px.base}/v1/chat/completions", headers=h, timeout=30,
                      json={"model": "gpt-5.4", "messages": MSG, "stream": True}) as r:
        for _ in r.iter_raw():
            arrivals.append(time.monotonic() - t0)
    # 8 content chunks 200 ms apart: the whole stream takes > 1.4 s; the first bytes come at once.
    assert arrivals[-1] > 1.4
    assert arrivals[0] < 0.5, arrivals[:3]
    assert len(arrivals) >= 6


def test_client_disconnect_closes_upstream(core) -> None:  # type: ignore[no-untyped-def]
    sim, px, _ = core
    before = httpx.get(f"{sim.base}/_sim/stats").json()["cancelled_streams"]
    h = {**bearer("alice-1"), "x-sim-chunk-delay-ms": "100", "x-sim-chunks": "200"}
    with httpx.stream("POST", f"{px.base}/v1/chat/completions", headers=h, timeout=30,
                      json={"model": "gpt-5.4", "messages": MSG, "stream": True}) as r:
        next(r.iter_raw())
    t_closed = time.monotonic()
    while time.monotonic() - t_closed < 1.0:
        if httpx.get(f"{sim.base}/_sim/stats").json()["cancelled_streams"] > before:
            break
        time.sleep(0.02)
    else:
        pytest.fail("upstream stream still open 1 s after the client left")


def test_header_hygiene(core) -> None:  # type: ignore[no-untyped-def]
    sim, px, _ = core
    key = KEYS["alice-1"][1]
    r = httpx.post(f"{px.base}/v1/chat/completions",
                   json={"model": "gpt-5.4", "messages": MSG},
                   headers={"Authorization": f"Bearer {key}", "Connection": "keep-alive, x-hop",
                            "x-hop": "1", "x-custom": "kept", "x-forwarded-for": "10.9.9.9",
                            "x-request-id": "client-req-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-req-1"
    # The provider's own rate-limit headers are replaced; its credential never comes back.
    assert r.headers.get("x-ratelimit-limit-requests") != "9999"
    assert all(s not in str(r.headers) + r.text for s in PROVIDER_SECRETS)
    seen = httpx.get(f"{sim.base}/_sim/last_request").json()["headers"]
    assert key not in json.dumps(seen)
    assert seen["authorization"] == f"Bearer {PROVIDER_SECRETS[0]}"
    assert "x-hop" not in seen and seen["x-custom"] == "kept"
    assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert seen["x-request-id"] == "client-req-1"
    assert seen["host"] == f"127.0.0.1:{sim.port}"


def test_auth_by_both_headers(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    body = {"model": "gpt-5.4", "messages": MSG}
    url = f"{px.base}/v1/chat/completions"
    assert httpx.post(url, json=body, headers={"x-api-key": KEYS["alice-1"][1]}).status_code == 200
    assert httpx.post(url, json=body, headers=bearer("alice-1")).status_code == 200
    two = httpx.post(url, json=body, headers={**bearer("alice-1"), "x-api-key": KEYS["bob-1"][1]})
    assert two.status_code == 401
    same = httpx.post(url, json=body, headers={**bearer("alice-1"), "x-api-key": KEYS["alice-1"][1]})
    assert same.status_code == 200


@pytest.mark.parametrize(("headers", "path", "body", "status", "code"), [
    ({}, "/v1/chat/completions", {"model": "gpt-5.4"}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer nope"}, "/v1/chat/completions", {"model": "gpt-5.4"}, 401,
     "invalid_api_key"),
    ({"Authorization": f"Bearer {KEYS['carol-1'][1]}"}, "/v1/chat/completions",
     {"model": "gpt-5.4", "messages": MSG}, 403, "model_not_allowed"),
    (bearer("alice-1"), "/v1/chat/completions", b"{not json", 400, "invalid_json"),
    (bearer("alice-1"), "/v1/chat/completions", b"x" * 70000, 413, "request_too_large"),
    (bearer("alice-1"), "/v9/nothing", {"model": "gpt-5.4"}, 404, "unknown_route"),
])
def test_error_rows(core, headers, path, body, status, code) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{px.base}{path}", headers=headers, **kw)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and "message" in err and "type" in err and err["param"] is None


def test_allowlisted_model_passes(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    r = httpx.post(f"{px.base}/v1/chat/completions", headers=bearer("carol-1"),
                   json={"model": "gpt-4o-mini", "messages": MSG})
    assert r.status_code == 200


def test_upstream_unreachable_and_timeout(tmp_path: Path) -> None:
    dead = free_port()
    with simulator() as sim:
        cfg = make_config(sim.port, server={"upstream_timeout_s": 0.5})
        cfg["providers"]["sim"]["base_url"] = f"http://127.0.0.1:{dead}"
        with proxy(write_config(tmp_path / "c.yaml", cfg)) as px:
            r = httpx.post(f"{px.base}/v1/chat/completions", headers=bearer("alice-1"),
                           json={"model": "gpt-5.4", "messages": MSG})
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
            r = httpx.post(f"{px.base}/v4/beta/chat/completions",
                           headers={**bearer("alice-1"), "x-sim-first-token-delay-ms": "3000"},
                           json={"model": "openai/gpt-4o", "messages": MSG, "stream": False})
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
            assert httpx.get(f"{px.base}/healthz").status_code == 200


def test_provider_errors_pass_through(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    for status in (429, 500):
        r = httpx.post(f"{px.base}/v1/chat/completions",
                       headers={**bearer("alice-1"), "x-sim-status": str(status)},
                       json={"model": "gpt-5.4", "messages": MSG})
        assert r.status_code == status
        assert "error" in r.json()


def test_admin_refuses_client_keys(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    assert httpx.get(f"{px.base}/admin/usage", headers=bearer("alice-1")).status_code == 403
    assert httpx.get(f"{px.base}/admin/usage").status_code == 401
    ok = httpx.get(f"{px.base}/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert ok.status_code == 200 and "total" in ok.json()
    bad = httpx.get(f"{px.base}/admin/usage/records?since_id=garbage",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since_id"


def test_path_traversal_rejected(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    with socket.create_connection(("127.0.0.1", px.port)) as s:
        s.sendall(b"GET /v1/../admin/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + KEYS["alice-1"][1].encode() + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data[:200]


def test_health_and_ready(core) -> None:  # type: ignore[no-untyped-def]
    _, px, _ = core
    assert httpx.get(f"{px.base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{px.base}/readyz").status_code == 200
