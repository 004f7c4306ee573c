"""Issue #14, hostile requests: no path spelling, method or body shape bypasses the model allowlist,
run ownership or admission, and no such input answers 5xx.

One simulator + proxy. The simulator's request counter proves what reached the provider.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import bearer, make_config, proxy, write_config
from tests.procs import Proc, simulator

MSG = [{"role": "user", "content": "hi"}]
CAROL = bearer("carol-1")          # allowlist: gpt-4o-mini only
ALICE = bearer("alice-1")          # no allowlist; tpm 1000 (below)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, httpx.Client]]:
    keys = {"carol-1": {"models": ["gpt-4o-mini"]}, "alice-1": {"limits": {"tpm": 1000}}}
    with simulator() as sim:
        cfg = make_config(sim.port, keys=keys)
        with proxy(write_config(tmp_path_factory.mktemp("hreq") / "c.yaml", cfg)) as px, \
                httpx.Client(timeout=30) as client:
            yield sim, px, client
            assert px.proc.poll() is None
            assert "Traceback" not in px.output(), px.output()[-3000:]


def _count(client: httpx.Client, sim: Proc) -> int:
    n: int = client.get(f"{sim.base}/_sim/stats").json()["requests"]
    return n


def _send(target: tuple[Proc, Proc, httpx.Client], method: str, path: str, headers: dict[str, str],
          **kw: Any) -> tuple[httpx.Response, int]:
    """The proxy's answer and how many requests the provider saw for it."""
    sim, px, client = target
    before = _count(client, sim)
    r = client.request(method, px.base + path, headers=headers, **kw)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    return r, _count(client, sim) - before


def _raw(px: Proc, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A request with its path exactly as written (httpx would normalise `%2F` or `//`)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


# --- model allowlist on every path and spelling ----------------------------------------------------

JSON_PATHS = ["/v1/images/generations", "/v1/audio/speech", "/v1/fine_tuning/jobs", "/v1/moderations",
              "/v1/chat/completions/", "/v1/chat/completions;x=1", "/v1//chat/completions",
              "/v1/embeddings/", "/v1/responses;a=b/", "/v1/batches"]


@pytest.mark.parametrize("path", JSON_PATHS)
def test_forbidden_model_refused_on_every_json_path(target: tuple[Proc, Proc, httpx.Client], path: str) -> None:
    r, forwarded = _send(target, "POST", path, CAROL, json={"model": "gpt-5.4", "input": "x", "messages": MSG})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", r.text
    assert forwarded == 0
    # The allowed model on the same path goes through (whatever the provider answers to it).
    r, forwarded = _send(target, "POST", path, CAROL, json={"model": "gpt-4o-mini", "input": "x", "messages": MSG})
    assert forwarded == 1, r.text


def test_forbidden_model_refused_for_put_and_patch(target: tuple[Proc, Proc, httpx.Client]) -> None:
    for method in ("PUT", "PATCH", "DELETE"):
        r, forwarded = _send(target, method, "/v1/fine_tuning/jobs/x", CAROL,
                             content=json.dumps({"model": "gpt-5.4"}))
        assert r.status_code == 403 and forwarded == 0, (method, r.text)


def test_forbidden_model_in_the_path(target: tuple[Proc, Proc, httpx.Client]) -> None:
    for path in ("/v1/models/gemini-3.1-pro:generateContent", "/v1/models/gemini-3.1-pro:countTokens",
                 "/v1/models/gemini-3.1-pro:streamGenerateContent/"):
        r, forwarded = _send(target, "POST", path, CAROL, json={"contents": []})
        assert r.status_code == 403 and forwarded == 0, (path, r.text)
    # A body model cannot launder a path model.
    r, forwarded = _send(target, "POST", "/v1/models/gemini-3.1-pro:generateContent", CAROL,
                         json={"model": "gpt-4o-mini", "contents": []})
    assert r.status_code == 403 and forwarded == 0


def test_forbidden_model_in_a_multipart_form(target: tuple[Proc, Proc, httpx.Client]) -> None:
    files = {"file": ("a.mp3", b"\x00\x01" * 500, "audio/mpeg")}
    r, forwarded = _send(target, "POST", "/v1/audio/transcriptions", CAROL, files=files,
                         data={"model": "whisper-1"})
    assert r.status_code == 403 and forwarded == 0, r.text
    r, forwarded = _send(target, "POST", "/v1/audio/transcriptions", CAROL, files=files,
                         data={"model": "gpt-4o-mini"})
    assert forwarded == 1
    # Two model fields: which one the provider reads is not ours to guess.
    r, forwarded = _send(target, "POST", "/v1/audio/transcriptions", CAROL, files=files,
                         data={"model": ["gpt-4o-mini", "whisper-1"]})
    assert r.status_code == 400 and forwarded == 0, r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions%00", "/v1/chat/completions%0a",
                                  "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/x%5Cy"])
def test_odd_encodings_refused(target: tuple[Proc, Proc, httpx.Client], path: str) -> None:
    sim, px, client = target
    before = _count(client, sim)
    data = _raw(px, "POST", path, {**CAROL, "Content-Type": "application/json"},
                json.dumps({"model": "gpt-5.4", "messages": MSG}).encode())
    assert data.startswith(b"HTTP/1.1 400 "), data[:300]
    assert _count(client, sim) == before


# --- ambiguous and hostile bodies --------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b'{"model": "gpt-5.4", "model": "gpt-4o-mini", "messages": []}',
    b'{"model": "gpt-4o-mini", "model": "gpt-5.4", "messages": []}',
    b'{"model": "gpt-5.4", "mod\\u0065l": "gpt-4o-mini", "messages": []}',
    b'{"stream": false, "messages": [], "model": "gpt-4o-mini", "stream": true}',
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations"])
def test_duplicate_top_level_keys_refused(target: tuple[Proc, Proc, httpx.Client], body: bytes,
                                          path: str) -> None:
    r, forwarded = _send(target, "POST", path, {**CAROL, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert "repeats" in r.json()["error"]["message"]
    assert forwarded == 0


def test_key_names_inside_values_are_not_duplicates(target: tuple[Proc, Proc, httpx.Client]) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": '"model" "model" {"model": 1}'}],
            "metadata": {"model": "x"}}
    r, forwarded = _send(target, "POST", "/v1/chat/completions", CAROL, json=body)
    assert r.status_code == 200 and forwarded == 1, r.text


@pytest.mark.parametrize("depth", [254, 300, 1000])
def test_deep_streaming_body_is_not_a_5xx(target: tuple[Proc, Proc, httpx.Client], depth: int) -> None:
    """300 levels answered 500 (include_usage re-serialised the body, orjson.dumps stops at 255)."""
    nested = "[" * depth + "]" * depth
    body = f'{{"model": "gpt-5.4", "stream": true, "messages": [{{"role": "user", "content": "hi"}}], "x": {nested}}}'
    r, forwarded = _send(target, "POST", "/v1/chat/completions", bearer("alice-2"), content=body.encode())
    assert r.status_code == 200 and forwarded == 1, r.text[:300]
    assert "data: [DONE]" in r.text
    # With a stream_options member the body must be re-serialised: refused with a 400 when too deep.
    body = body.replace('"stream": true', '"stream": true, "stream_options": {}')
    r, forwarded = _send(target, "POST", "/v1/chat/completions", bearer("alice-2"), content=body.encode())
    assert (r.status_code == 200 and forwarded == 1) or (r.status_code == 400 and forwarded == 0), r.text[:300]
    if depth >= 300:
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_n_beyond_the_cap_refused(target: tuple[Proc, Proc, httpx.Client]) -> None:
    for n in (129, 10**6, 1e9):
        r, forwarded = _send(target, "POST", "/v1/chat/completions", bearer("alice-2"),
                             json={"model": "gpt-5.4", "messages": MSG, "n": n})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n" and forwarded == 0, r.text
    r, forwarded = _send(target, "POST", "/v1/chat/completions", bearer("alice-2"),
                         json={"model": "gpt-5.4", "messages": MSG, "n": 2, "max_tokens": 5})
    assert r.status_code == 200 and forwarded == 1


def test_long_model_id_refused_before_forwarding(target: tuple[Proc, Proc, httpx.Client]) -> None:
    for path in ("/v1/chat/completions", "/v1/images/generations"):
        r, forwarded = _send(target, "POST", path, bearer("alice-2"),
                             json={"model": "m" * 257, "messages": MSG})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model" and forwarded == 0, r.text
    r, forwarded = _send(target, "POST", "/v1/chat/completions", bearer("alice-2"),
                         json={"model": "m" * 256, "messages": MSG})
    assert r.status_code < 500 and forwarded == 1


def test_long_request_id_is_replaced(target: tuple[Proc, Proc, httpx.Client]) -> None:
    sim, _px, client = target
    r, forwarded = _send(target, "POST", "/v1/chat/completions", {**bearer("alice-2"), "x-request-id": "r" * 129},
                         json={"model": "gpt-5.4", "messages": MSG})
    assert r.status_code == 200 and forwarded == 1
    ours = r.headers["x-request-id"]
    assert ours != "r" * 129 and len(ours) <= 128
    assert client.get(f"{sim.base}/_sim/last_request").json()["headers"]["x-request-id"] == ours


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1/chat/completions;x=1", "/v1//chat/completions",
                                  "/v1/responses/", "/v1/completions;v=2/"])
def test_spellings_of_metered_paths_are_admitted_as_metered(target: tuple[Proc, Proc, httpx.Client],
                                                             path: str) -> None:
    """alice-1 has tpm 1000: a 5,000-token request is "Request too large" on every spelling (the
    trailing slash was neither reserved nor metered), and it is so whatever max-output field."""
    r, forwarded = _send(target, "POST", path, ALICE,
                         json={"model": "gpt-5.4", "messages": MSG, "input": "x", "prompt": "x",
                               "max_tokens": 5000})
    assert r.status_code == 429 and r.json()["error"]["message"].startswith("Request too large"), r.text
    assert forwarded == 0


# --- async run ownership: every method and spelling ---------------------------------------------------

@pytest.fixture(scope="module")
def run_uid(target: tuple[Proc, Proc, httpx.Client]) -> str:
    _sim, px, client = target
    r = client.post(f"{px.base}/v3/ai/chat_completion", headers=bearer("alice-2"),
                    json={"model": "gpt-5.4", "messages": MSG, "async": True, "stream": False})
    assert r.status_code == 200, r.text
    uid: str = r.json()["uid"]
    return uid


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "POST", "PUT", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("spelling", ["{uid}", "{uid}/", "/{uid}", "{uid};x=1", "{uid}/cancel",
                                      "{uid}//", "", "/"])
def test_another_keys_run_is_404_for_every_method_and_spelling(
        target: tuple[Proc, Proc, httpx.Client], run_uid: str, method: str, spelling: str) -> None:
    sim, px, client = target
    path = "/v3/ai/chat_completion_runs/" + spelling.format(uid=run_uid)
    before = _count(client, sim)
    body = b'{"model": "gpt-4o-mini"}' if method in ("POST", "PUT", "PATCH") else b""
    data = _raw(px, method, path, {**bearer("carol-1"), "Content-Type": "application/json"}, body)
    assert data.startswith(b"HTTP/1.1 404 "), (path, data[:300])
    assert _count(client, sim) == before, path


def test_encoded_slash_after_the_uid_is_refused(target: tuple[Proc, Proc, httpx.Client], run_uid: str) -> None:
    sim, px, client = target
    before = _count(client, sim)
    data = _raw(px, "GET", f"/v3/ai/chat_completion_runs/{run_uid}%2F", bearer("carol-1"))
    assert data.startswith(b"HTTP/1.1 400 "), data[:300]
    assert _count(client, sim) == before


def test_owner_head_does_not_meter_and_get_meters_once(target: tuple[Proc, Proc, httpx.Client],
                                                       run_uid: str) -> None:
    _sim, px, client = target
    owner = bearer("alice-2")

    def tokens() -> int:
        day = client.get(f"{px.base}/usage", headers=owner).json()["day"]
        return int(day["prompt_tokens"]) + int(day["completion_tokens"])

    start = tokens()
    assert client.head(f"{px.base}/v3/ai/chat_completion_runs/{run_uid}", headers=owner).status_code < 500
    assert tokens() == start
    statuses = [client.get(f"{px.base}/v3/ai/chat_completion_runs/{run_uid}", headers=owner).json()["status"]
                for _ in range(3)]
    assert statuses[-1] == "completed"
    metered = tokens()
    assert metered > start
    client.get(f"{px.base}/v3/ai/chat_completion_runs/{run_uid}", headers=owner)
    assert tokens() == metered



def _requests_metric(client: httpx.Client, px: Proc, key: str, model: str) -> float:
    total = 0.0
    for line in client.get(f"{px.base}/metrics").text.splitlines():
        if line.startswith("meterproxy_requests_total{") and f'key="{key}"' in line and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_pass_through_with_a_model_is_counted_under_it(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """A pass-through path is not metered, but a model it names is counted (requests metric)."""
    _sim, px, client = target
    before = _requests_metric(client, px, "carol-1", "gpt-4o-mini")
    _r, forwarded = _send(target, "POST", "/v1/images/generations", CAROL, json={"model": "gpt-4o-mini", "prompt": "x"})
    assert forwarded == 1
    assert _requests_metric(client, px, "carol-1", "gpt-4o-mini") == before + 1


def test_pass_through_model_without_price_is_not_unpriced(target: tuple[Proc, Proc, httpx.Client]) -> None:
    _sim, px, client = target

    def unpriced() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in client.get(f"{px.base}/metrics").text.splitlines()
                   if line.startswith('meterproxy_unpriced_requests_total{model="dall-e-9"'))

    before = unpriced()
    _r, forwarded = _send(target, "POST", "/v1/images/generations", bearer("alice-2"),
                         json={"model": "dall-e-9", "prompt": "x"})
    assert forwarded == 1
    assert _requests_metric(client, px, "alice-2", "dall-e-9") >= 1
    assert unpriced() == before


def test_forbidden_model_in_a_message_batch(target: tuple[Proc, Proc, httpx.Client]) -> None:
    batch = {"requests": [{"custom_id": "a", "params": {"model": "gpt-4o-mini", "messages": MSG}},
                          {"custom_id": "b", "params": {"model": "gpt-5.4", "messages": MSG}}]}
    r, forwarded = _send(target, "POST", "/v1/messages/batches", CAROL, json=batch)
    assert r.status_code == 403 and forwarded == 0, r.text
    batch["requests"] = batch["requests"][:1]
    r, forwarded = _send(target, "POST", "/v1/messages/batches", CAROL, json=batch)
    assert forwarded == 1


def test_forbidden_model_in_a_batch_input_file(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """A batch input file names the models the provider will run later: its lines are allowlisted."""
    def upload(*models: str) -> tuple[httpx.Response, int]:
        lines = "\n".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": m, "messages": MSG}}) for i, m in enumerate(models))
        return _send(target, "POST", "/v1/files", CAROL, data={"purpose": "batch"},
                     files={"file": ("batch.jsonl", lines.encode(), "application/jsonl")})

    r, forwarded = upload("gpt-4o-mini", "gpt-5.4")
    assert r.status_code == 403 and forwarded == 0, r.text
    _r, forwarded = upload("gpt-4o-mini", "gpt-4o-mini")
    assert forwarded == 1
