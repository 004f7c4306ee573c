"""Issue #7, hostile input: generated bodies, headers and paths against the metered endpoints.

One long-lived simulator + proxy. For every request the test knows, from the simulator's own
request counter, whether the proxy forwarded it, and checks:

- never a 5xx, never a crash (the process is alive, /healthz answers, no traceback in its log);
- a forwarded request carried exactly one valid key of a key that may be admitted (alice-1,
  alice-2; never bob-1, whose budget is 0, never carol-1 with a model outside its allowlist),
  and reached the provider with the provider's credential only;
- a refused request got the proxy's own error in the OpenAI shape.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.cluster import KEYS, PROVIDER_SECRETS, make_config, proxy, write_config
from tests.procs import ROOT, Proc, simulator

PATHS = ["/v1/chat/completions", "/v4/beta/chat/completions", "/v3/ai/chat_completion",
         "/v1/completions", "/v1/embeddings", "/v1/responses"]
ADMITTED = {"alice-1", "alice-2"}          # bob-1: daily_tokens 0; carol-1: gpt-4o-mini only (below)
PROXY_CODES = {"invalid_api_key", "model_not_allowed", "insufficient_quota", "rate_limit_exceeded",
               "invalid_json", "invalid_request", "request_too_large", "unknown_route", "not_found"}
MAX_BODY = 65536
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, httpx.Client]]:
    keys = {"bob-1": {"limits": {"daily_tokens": 0}}, "carol-1": {"models": ["gpt-4o-mini"]}}
    with simulator() as sim:
        cfg = make_config(sim.port, keys=keys, server={"max_body_bytes": MAX_BODY})
        with proxy(write_config(tmp_path_factory.mktemp("hostile") / "c.yaml", cfg)) as px, \
                httpx.Client(timeout=30) as client:
            yield sim, px, client
            log = px.output()
            assert px.proc.poll() is None
            assert "Traceback" not in log and "metering failed" not in log, log[-3000:]


def _sim_requests(client: httpx.Client, sim: Proc) -> int:
    n: int = client.get(f"{sim.base}/_sim/stats").json()["requests"]
    return n


def _presented(headers: list[tuple[str, str]]) -> list[str]:
    """The key values a request carries, as the proxy reads them (Bearer token or x-api-key)."""
    out = []
    for name, value in headers:
        low = name.lower()
        if low == "authorization":
            scheme, _, token = value.strip().partition(" ")
            out.append(token.strip() if scheme.lower() == "bearer" else "\0not-bearer")
        elif low == "x-api-key":
            out.append(value.strip())
    return out


def _key_id(secret: str) -> str | None:
    return next((k for k, (_, s) in KEYS.items() if s == secret), None)


def _model(body: bytes) -> Any:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return obj.get("model") if isinstance(obj, dict) else None


def _check(sim: Proc, px: Proc, client: httpx.Client, method: str, path: str,
           headers: list[tuple[str, str]], body: bytes, tally: Counter[str] | None = None) -> httpx.Response:
    headers = [(n, v.strip()) for n, v in headers]
    before = _sim_requests(client, sim)
    r = client.request(method, px.base + path, headers=headers, content=body)
    forwarded = _sim_requests(client, sim) - before
    assert r.status_code < 500, (r.status_code, r.text[:300], path, headers, body[:200])
    assert forwarded in (0, 1)
    if forwarded:
        keys = set(_presented(headers))
        assert len(keys) == 1, ("forwarded with keys", keys)
        key_id = _key_id(keys.pop())
        assert key_id in ADMITTED or (key_id == "carol-1" and _model(body) == "gpt-4o-mini"), \
            ("forwarded for", key_id, body[:200])
        seen = client.get(f"{sim.base}/_sim/last_request").json()
        dumped = json.dumps(seen["headers"])
        assert not any(secret in dumped for _, secret in KEYS.values())
        assert seen["headers"].get("authorization", "").removeprefix("Bearer ") in PROVIDER_SECRETS \
            or seen["headers"].get("x-api-key") in PROVIDER_SECRETS
    else:
        err = r.json()["error"]
        assert r.status_code in (400, 401, 403, 404, 413, 429), r.status_code
        assert err["code"] in PROXY_CODES and isinstance(err["message"], str), err
    if tally is not None:
        tally["forwarded" if forwarded else "refused"] += 1
    return r


# --- bodies ----------------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30), st.sampled_from([-1, 0, 2**31, 2**63 - 1, 10**18, 1e308, -1e308]),
)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=10), c, max_size=4), max_leaves=20)
absurd = st.one_of(st.sampled_from([-1, 0, 2**31, 2**62, 10**12, -(2**62), 1.5, 1e300, "100", True, None,
                                    [], {}]), st.integers(-(2**63), 2**63 - 1))
messages = st.one_of(
    st.just([{"role": "user", "content": "hi"}]),
    json_value,
    st.lists(st.one_of(json_value, st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "tool"]), json_value),
         "content": json_value})), max_size=3),
)
model = st.one_of(st.sampled_from(["gpt-5.4", "gpt-4o-mini", "openai/gpt-4o", "o4-mini", ""]), json_value)
chat_body = st.fixed_dictionaries({"model": model, "messages": messages}, optional={
    "max_tokens": absurd, "max_completion_tokens": absurd, "max_output_tokens": absurd, "n": absurd,
    "stream": st.one_of(st.booleans(), json_value), "stream_options": json_value,
    "tools": json_value, "input": json_value, "prompt": json_value, "async": json_value,
})


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False).encode()


raw_body = st.one_of(
    chat_body.map(_encode),
    json_value.map(_encode),
    st.binary(max_size=300),                                              # non-UTF-8, anything
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    st.integers(1, 200_000).map(lambda d: b"[" * d + b"]" * d),           # deep nesting
    st.integers(1, 5_000).map(lambda d: b'{"model": "gpt-5.4", "messages": ' + b"[" * d + b"]" * d + b"}"),
    st.integers(300, 5_000).map(lambda d: b'{"model": "gpt-5.4", "max_tokens": 1' + b"0" * d + b"}"),
    st.just(b'{"model": "gpt-5.4", "messages": [], "n": 1e400}'),
    st.just(b'{"model": "gpt-5.4", "model": ["x"], "messages": []}'),    # duplicate keys
    st.just(b"x" * (MAX_BODY + 1)),
)
good_key = st.sampled_from(sorted(KEYS))


def test_generated_bodies(target: tuple[Proc, Proc, httpx.Client]) -> None:
    sim, px, client = target
    tally: Counter[str] = Counter()

    @SETTINGS
    @given(path=st.sampled_from(PATHS), key=good_key, body=raw_body,
           how=st.sampled_from(["bearer", "x-api-key"]))
    def run(path: str, key: str, body: bytes, how: str) -> None:
        secret = KEYS[key][1]
        hdr = ("Authorization", f"Bearer {secret}") if how == "bearer" else ("x-api-key", secret)
        _check(sim, px, client, "POST", path, [hdr, ("Content-Type", "application/json")], body, tally)

    run()
    # The generator reaches both sides of the gate, so the checks above bit on both.
    assert tally["forwarded"] >= 10 and tally["refused"] >= 10, tally


# --- headers ---------------------------------------------------------------------------------------

# Printable ASCII without edge whitespace (HTTP clients refuse to send that; raw tests below do).
header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
any_secret = st.one_of(st.sampled_from([s for _, s in KEYS.values()]), header_value,
                       st.sampled_from(["", " ", "Bearer", PROVIDER_SECRETS[0], "mp-test-alice-1 "]))
auth_header = st.one_of(
    any_secret.map(lambda k: ("Authorization", f"Bearer {k}")),
    any_secret.map(lambda k: ("authorization", f"bearer  {k}")),
    any_secret.map(lambda k: ("Authorization", f"Basic {k}")),
    any_secret.map(lambda k: ("Authorization", k)),
    any_secret.map(lambda k: ("x-api-key", k)),
    any_secret.map(lambda k: ("X-API-KEY", k)),
)
# One valid key, in either header or in both with the same value (half of them not admitted).
one_key = st.sampled_from([s for _, s in KEYS.values()]).flatmap(lambda k: st.sampled_from([
    [("Authorization", f"Bearer {k}")], [("x-api-key", k)], [("Authorization", f"Bearer {k}"), ("x-api-key", k)],
    [("authorization", f"bearer {k}"), ("Authorization", f"Bearer {k}")]]))
other_header = st.tuples(
    st.one_of(st.sampled_from(["x-forwarded-for", "x-forwarded-host", "x-request-id", "host-override",
                               "connection", "content-encoding", "x-real-ip", "forwarded", "te",
                               "proxy-authorization", "x-ratelimit-limit-requests", "cookie"]),
              st.from_regex(r"\Ax-[a-z]{1,12}\Z")).filter(lambda n: not n.startswith("x-sim")),
    header_value)


def test_generated_auth_headers(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """Missing, duplicated, conflicting, malformed keys, in either header or both, with odd other
    headers: only exactly one admitted key ever reaches the provider."""
    sim, px, client = target
    tally: Counter[str] = Counter()

    @SETTINGS
    @given(path=st.sampled_from(PATHS), auth=st.one_of(one_key, st.lists(auth_header, max_size=4)),
           other=st.lists(other_header, max_size=4), model=st.sampled_from(["gpt-5.4", "gpt-4o-mini"]))
    def run(path: str, auth: list[tuple[str, str]], other: list[tuple[str, str]], model: str) -> None:
        body = _encode({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        headers = [*auth, *other, ("Content-Type", "application/json")]
        if any(n.lower() == "connection" for n, _ in other):
            headers = [(n, v) for n, v in headers if n.lower() != "connection"]   # would close httpx's pool
        _check(sim, px, client, "POST", path, headers, body, tally)

    run()
    assert tally["forwarded"] >= 10 and tally["refused"] >= 10, tally


def test_two_different_keys_are_rejected(target: tuple[Proc, Proc, httpx.Client]) -> None:
    sim, px, client = target
    a, b = KEYS["alice-1"][1], KEYS["alice-2"][1]
    body = _encode({"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]})
    for headers in ([("Authorization", f"Bearer {a}"), ("x-api-key", b)],
                    [("Authorization", f"Bearer {a}"), ("Authorization", f"Bearer {b}")],
                    [("x-api-key", a), ("x-api-key", b)],
                    [("x-api-key", b), ("Authorization", f"Bearer {a}")]):
        r = _check(sim, px, client, "POST", "/v1/chat/completions", headers, body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# --- raw requests: CR/LF injection, paths -----------------------------------------------------------

def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _raw_check(sim: Proc, px: Proc, client: httpx.Client, request: bytes) -> tuple[int, bytes, int]:
    before = _sim_requests(client, sim)
    data = _raw(px.port, request)
    forwarded = _sim_requests(client, sim) - before
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    assert status == 0 or status < 500, data[:300]     # 0: the parser dropped the connection
    return status, data, forwarded


ALICE = KEYS["alice-1"][1].encode()
BODY = b'{"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize("inject", [
    b"x-custom: a\rInjected: 1\r\n",                       # bare CR
    b"x-custom: a\nInjected: 1\r\n",                       # bare LF
    b"x-custom: a\r\n Injected: 1\r\n",                    # obsolete line folding
    b"x-request-id: abc\r\n\r\nGET /admin/usage HTTP/1.1\r\n",   # smuggled second request
    b"x-request-id: a\x00b\r\n",
    b"x-api-key: " + ALICE + b"\r\nAuthorization: Bearer " + KEYS["bob-1"][1].encode() + b"\r\n",
    b"Authorization: Bearer " + ALICE + b"\r\nTransfer-Encoding: chunked\r\n",   # CL + TE
    b"x-forwarded-for: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8\r\n",
])
def test_header_injection_attempts(target: tuple[Proc, Proc, httpx.Client], inject: bytes) -> None:
    """Raw requests with CR/LF tricks: refused by the HTTP parser or the proxy, or forwarded with
    nothing injected — never a 5xx, never a header the client could not have sent plainly, never
    a second request."""
    sim, px, client = target
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + ALICE + b"\r\n" + inject +
           b"Content-Length: " + str(len(BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + BODY)
    status, data, forwarded = _raw_check(sim, px, client, req)
    assert b'"rows"' not in data and b'"records"' not in data    # no admin answer smuggled through
    if forwarded:
        seen = client.get(f"{sim.base}/_sim/last_request").json()
        assert seen["path"] == "/v1/chat/completions"
        assert all("\r" not in v and "\n" not in v for v in seen["headers"].values())
        assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_SECRETS[0]}"
        assert ALICE.decode() not in json.dumps(seen)
    if b"x-api-key: " + ALICE in inject:
        assert status == 401 and not forwarded       # two different keys


TRAVERSALS = [
    "/v1/../admin/usage", "/v1/%2e%2e/admin/usage", "/v1/%2E%2E/admin/usage", "/v1/..%2fadmin/usage",
    "/v1/..%2Fadmin%2Fusage", "/v1/.%2e/admin/usage", "/v1/./chat/completions", "/v1/chat/completions/..",
    "/v1/chat/completions/.", "/v1/..\\admin/usage", "/v1/%5c..%5cadmin/usage", "//admin/usage",
    "/v1//../admin/usage", "/v1/%252e%252e/admin/usage", "/v1/chat/completions%00", "/v1/%00/../admin",
    "/admin/usage/../../v1/chat/completions", "/v1/chat/completions?x=/../../admin/usage",
    "/v1/chat/completions#/../admin", "/admin/usage/records/..", "/%2e%2e/v1/chat/completions",
    "/v1/chat%2fcompletions", "http://evil.example/v1/chat/completions", "*",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal(target: tuple[Proc, Proc, httpx.Client], path: str) -> None:
    """Dot segments, encoded or not, never reach a provider or an admin endpoint; whatever is
    forwarded stays under a configured provider prefix."""
    sim, px, client = target
    req = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() +
           b"Authorization: Bearer " + ALICE + b"\r\nContent-Length: " + str(len(BODY)).encode() +
           b"\r\nConnection: close\r\n\r\n" + BODY)
    status, data, forwarded = _raw_check(sim, px, client, req)
    _head, _, payload = data.partition(b"\r\n\r\n")
    assert b'"rows"' not in payload and b'"records"' not in payload   # never an admin answer
    if forwarded:
        seen = client.get(f"{sim.base}/_sim/last_request").json()
        decoded = seen["path"]
        assert decoded.startswith(("/v1/", "/v4/beta/", "/v3/ai/")), decoded
        assert "/../" not in decoded and "/./" not in decoded and not decoded.endswith(("/..", "/.")), decoded
    else:
        assert status in (0, 400, 401, 403, 404), data[:300]


def test_still_healthy_after_all(target: tuple[Proc, Proc, httpx.Client]) -> None:
    _sim, px, client = target
    assert client.get(f"{px.base}/healthz").status_code == 200
    r = client.post(f"{px.base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['alice-1'][1]}"},
                    json={"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


@pytest.mark.parametrize("limit", ["rpm", "tpm"])
def test_zero_rate_is_refused_at_load(tmp_path: Path, limit: str) -> None:
    """rpm/tpm 0 crashed the memory limiter (division by zero: 500 on every request) and made the
    Redis script fail, which fails open (the key unlimited): such a config is rejected up front."""
    cfg = make_config(1, keys={"alice-1": {"limits": {limit: 0}}})
    path = write_config(tmp_path / "c.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "meterproxy", "check-config", str(path)], cwd=ROOT,
                       capture_output=True, text=True, env={"SIM_OPENAI_KEY": "a", "SIM_VENDOR_KEY": "b",
                                                           "SIM_RUNS_KEY": "c", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert f"keys.0.limits.{limit}: must be at least 1" in r.stderr, r.stderr
