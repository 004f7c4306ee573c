"""Issue #11 "done when": Anthropic Messages and Gemini metered exactly end to end, JSON and
streamed, cache reads/writes and thinking included, with the official `anthropic` and
`google-genai` SDKs as clients, real proxy and simulator processes; their dollar budgets trip;
`unpriced: refuse` answers 403 model_not_priced before anything goes upstream.

The simulator is the provider: the usage its SDK client receives is the truth, and the ledger
record, the metrics and the cost (computed here with Decimal from the config's prices) must
match it exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import ADMIN_KEY, KEYS, make_config, proxy, write_config
from tests.procs import Proc, simulator

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLAUDE = {"input": "3", "cached_input": "0.3", "cache_write": "3.75", "output": "15"}
GEMINI = {"input": "1.25", "cached_input": "0.125", "output": "10"}
PRICING = {"claude-*": {k: float(v) for k, v in CLAUDE.items()},
           "gemini-*": {k: float(v) for k, v in GEMINI.items()}}


def native_config(sim_port: int, **kw: Any) -> dict[str, Any]:
    cfg = make_config(sim_port, **kw)
    base = f"http://127.0.0.1:{sim_port}"
    cfg["providers"]["anthropic"] = {"base_url": base, "paths": ["/v1/messages"],
                                     "auth": {"header": "x-api-key", "value": "sim-secret-anthropic"}}
    cfg["providers"]["gemini"] = {"base_url": base, "paths": ["/v1beta/"],
                                  "auth": {"header": "x-goog-api-key", "value": "sim-secret-gemini"}}
    cfg["pricing"].update(PRICING)
    return cfg


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    tmp = tmp_path_factory.mktemp("native")
    with simulator() as sim:
        cfg = native_config(sim.port, plans={"tiny": {"monthly_usd": 0.0002}},
                            keys={"carol-1": {"plan": "tiny"}})
        with proxy(write_config(tmp / "config.yaml", cfg)) as px:
            yield sim, px


def record(px: Proc, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        recs = httpx.get(f"{px.base}/admin/usage/records", params={"limit": "1000"}, headers=ADMIN).json()["records"]
        mine = [r for r in recs if r["request_id"] == rid]
        if mine:
            assert len(mine) == 1
            return mine[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no ledger record for {rid}")
        time.sleep(0.05)


def cache_write_metric(px: Proc, model: str) -> int:
    text = httpx.get(f"{px.base}/metrics").text
    return int(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "meterproxy_tokens_total" and s.labels.get("type") == "cache_write"
                   and s.labels.get("model") == model))


def cost_nano(price: dict[str, str], prompt: int, cached: int, write: int, completion: int) -> int:
    p = {k: Decimal(v) for k, v in price.items()}
    usd = ((prompt - cached - write) * p["input"] + cached * p["cached_input"]
           + write * p.get("cache_write", p["input"]) + completion * p["output"]) / 1_000_000
    return int(usd * 1_000_000_000)


def claude(px: Proc, key: str = "alice-1", **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=px.base, api_key=KEYS[key][1], max_retries=0,
                               default_headers=headers)


def gemini(px: Proc, key: str = "alice-1", **headers: str) -> genai.Client:
    return genai.Client(api_key=KEYS[key][1], http_options=types.HttpOptions(
        base_url=px.base, api_version="v1beta", headers=headers,
        retry_options=types.HttpRetryOptions(attempts=1)))


# --- Anthropic -----------------------------------------------------------------------------------

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about rivers and stones."}]


def check_anthropic(px: Proc, rid: str, u: Any, model: str) -> None:
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    rec = record(px, rid)
    assert (rec["prompt_tokens"], rec["cached_prompt_tokens"], rec["completion_tokens"], rec["reasoning_tokens"],
            rec["source"]) == (prompt, u.cache_read_input_tokens, u.output_tokens, 0, "provider")
    assert rec["cost_nano"] == cost_nano(CLAUDE, prompt, u.cache_read_input_tokens,
                                         u.cache_creation_input_tokens, u.output_tokens)


def test_anthropic_json_with_cache_and_thinking(stack: tuple[Proc, Proc]) -> None:
    _, px = stack
    model = "claude-sonnet-4-6"
    before = cache_write_metric(px, model)
    msg = claude(px, **{"x-sim-cached-tokens": "6", "x-sim-cache-write-tokens": "4"}).messages.create(
        model=model, max_tokens=1000, system="Be brief.", messages=MESSAGES,
        thinking={"type": "enabled", "budget_tokens": 1024}, extra_headers={"x-request-id": "an-json"})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert (msg.usage.cache_read_input_tokens, msg.usage.cache_creation_input_tokens) == (6, 4)
    check_anthropic(px, "an-json", msg.usage, model)
    assert cache_write_metric(px, model) - before == 4


def test_anthropic_stream_with_cache_and_thinking(stack: tuple[Proc, Proc]) -> None:
    _, px = stack
    client = claude(px, **{"x-sim-cached-tokens": "5", "x-sim-cache-write-tokens": "7"})
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=1000, messages=MESSAGES,
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                extra_headers={"x-request-id": "an-sse"}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.usage.output_tokens > 16   # thinking and text, counted once
    check_anthropic(px, "an-sse", final.usage, "claude-sonnet-4-6")


# --- Gemini --------------------------------------------------------------------------------------

def check_gemini(px: Proc, rid: str, um: Any) -> None:
    thoughts = um.thoughts_token_count or 0
    completion = um.candidates_token_count + thoughts
    rec = record(px, rid)
    assert (rec["prompt_tokens"], rec["cached_prompt_tokens"], rec["completion_tokens"], rec["reasoning_tokens"],
            rec["source"]) == (um.prompt_token_count, um.cached_content_token_count or 0, completion, thoughts,
                               "provider")
    assert rec["model"].startswith("gemini-")
    assert rec["cost_nano"] == cost_nano(GEMINI, um.prompt_token_count, um.cached_content_token_count or 0, 0,
                                         completion)


def test_gemini_json_with_cache_and_thoughts(stack: tuple[Proc, Proc]) -> None:
    _, px = stack
    client = gemini(px, **{"x-sim-cached-tokens": "3", "x-request-id": "gm-json"})  # kept: its __del__ closes it
    r = client.models.generate_content(model="gemini-2.5-pro", contents="Tell me about rivers and stones.")
    um = r.usage_metadata
    assert um is not None and um.thoughts_token_count == 16 and um.cached_content_token_count == 3
    check_gemini(px, "gm-json", um)


def test_gemini_stream_with_thoughts(stack: tuple[Proc, Proc]) -> None:
    _, px = stack
    client = gemini(px, **{"x-sim-cached-tokens": "2", "x-request-id": "gm-sse"})
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Tell me about rivers."))
    um = chunks[-1].usage_metadata
    assert um is not None and um.thoughts_token_count == 16
    check_gemini(px, "gm-sse", um)


# --- budgets and unpriced models -------------------------------------------------------------------

def test_dollar_budgets_trip_for_anthropic_and_gemini(stack: tuple[Proc, Proc]) -> None:
    _, px = stack
    # carol's plan allows $0.0002 a month; one answer of ~60 output tokens at $15/M spends it.
    claude(px, "carol-1").messages.create(model="claude-sonnet-4-6", max_tokens=40, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as info:
        claude(px, "carol-1").messages.create(model="claude-sonnet-4-6", max_tokens=40, messages=MESSAGES)
    assert info.value.status_code == 429
    assert info.value.body["error"]["code"] == "insufficient_quota"   # type: ignore[index]
    client = gemini(px, "carol-1")
    with pytest.raises(genai_errors.ClientError) as ginfo:
        client.models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert ginfo.value.code == 429


def test_unpriced_refuse_sends_nothing_upstream(tmp_path: Path) -> None:
    with simulator() as sim:
        cfg = native_config(sim.port, server={"unpriced": "refuse"})
        with proxy(write_config(tmp_path / "config.yaml", cfg)) as px:
            before = httpx.get(f"{sim.base}/_sim/stats").json()["requests"]
            oa = openai.OpenAI(base_url=f"{px.base}/v1", api_key=KEYS["alice-1"][1], max_retries=0)
            with pytest.raises(openai.PermissionDeniedError) as info:
                oa.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
            assert info.value.body["code"] == "model_not_priced"   # type: ignore[index]
            r = httpx.post(f"{px.base}/v1beta/models/unknown-model:generateContent",
                           headers={"x-goog-api-key": KEYS["alice-1"][1]}, json={"contents": "hi"})
            assert r.status_code == 403
            assert r.json()["error"]["type"] == "permission_error"
            assert r.json()["error"]["code"] == "model_not_priced"
            assert httpx.get(f"{sim.base}/_sim/stats").json()["requests"] == before   # nothing went upstream
            # A priced model passes.
            ok = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            assert ok.usage is not None


def test_stream_usage_always_never_injects_nor_strips(tmp_path: Path) -> None:
    with simulator() as sim:
        cfg = native_config(sim.port)
        cfg["providers"]["sim"]["stream_usage"] = "always"
        with proxy(write_config(tmp_path / "config.yaml", cfg)) as px:
            body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            auth = {"Authorization": f"Bearer {KEYS['alice-1'][1]}"}
            with httpx.stream("POST", f"{px.base}/v1/chat/completions", json=body,
                              headers={**auth, "x-request-id": "always-1"}) as r:
                text = r.read()
            assert "stream_options" not in httpx.get(f"{sim.base}/_sim/last_request").json()["body"]
            assert b'"usage"' not in text
            assert record(px, "always-1")["source"] == "estimated"   # this provider sent none
            asked = {**body, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{px.base}/v1/chat/completions", json=asked,
                              headers={**auth, "x-request-id": "always-2"}) as r:
                text = r.read()
            assert b'"choices":[],"usage":{' in text      # the client's own usage chunk is kept
            assert record(px, "always-2")["source"] == "provider"


def test_native_answers_without_usage_are_estimated(stack: tuple[Proc, Proc]) -> None:
    """No usage from the provider: prompt from system/messages/contents, completion from every
    thinking and text piece, counted once, marked estimated (never zero marked provider)."""
    from meterproxy.metering.estimate import count_text, estimate_prompt

    _, px = stack
    body: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 1000, "system": "Be brief.",
                            "messages": MESSAGES, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    # The SDK's stream helper needs usage to accumulate, so this stream is read raw.
    pieces: list[str] = []
    with httpx.stream("POST", f"{px.base}/v1/messages", json={**body, "stream": True}, timeout=30,
                      headers={"x-api-key": KEYS["alice-1"][1], "anthropic-version": "2023-06-01",
                               "x-sim-omit-usage": "1", "x-request-id": "an-omit"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                assert "usage" not in ev and "usage" not in ev.get("message", {})
                delta = ev.get("delta", {})
                pieces += [delta[k] for k in ("thinking", "text") if k in delta]
    rec = record(px, "an-omit")
    text = "".join(pieces)
    assert rec["source"] == "estimated"
    assert rec["prompt_tokens"] == estimate_prompt(body, body["model"]) > 0
    assert rec["completion_tokens"] == count_text(text, body["model"]) > 16

    gclient = gemini(px, **{"x-sim-omit-usage": "1", "x-request-id": "gm-omit"})
    chunks = list(gclient.models.generate_content_stream(model="gemini-2.0-flash", contents="Tell me about rivers."))
    rec = record(px, "gm-omit")
    assert rec["source"] == "estimated"
    assert rec["prompt_tokens"] > 0
    assert rec["completion_tokens"] == count_text("".join(c.text or "" for c in chunks), "gemini-2.0-flash") > 0
