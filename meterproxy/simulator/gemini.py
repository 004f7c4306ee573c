"""Gemini, POST /v1beta/models/{model}:generateContent and :streamGenerateContent (`?alt=sse`:
SSE framed with CRLF as Google sends it; without it a JSON array of the chunks).

usageMetadata as Gemini reports it: promptTokenCount includes the cached content (knob
x-sim-cached-tokens); candidatesTokenCount excludes thinking, reported as thoughtsTokenCount
(thinking models: ids containing "2.5" or "thinking", unless thinkingBudget is 0). Streamed
chunks carry cumulative usageMetadata.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import TYPE_CHECKING, Any

import orjson

from meterproxy.simulator.plan import DEFAULT_LENGTH, Reply
from meterproxy.simulator.tokens import _joined, _seed, count_tokens, words
from meterproxy.simulator.wire import JSON, Call, _plain_json

if TYPE_CHECKING:
    from meterproxy.simulator.app import Simulator

PATH = re.compile(r"^/v1(?:beta|alpha)?/models/([^/:]+):(generateContent|streamGenerateContent)$")
_ENC = "o200k_base"
_THINK_WORDS = 16


def _dict(v: Any) -> JSON:
    return v if isinstance(v, dict) else {}


def _parts_tokens(parts: Any) -> int:
    n = 0
    for p in parts if isinstance(parts, list) else []:
        if isinstance(p, dict):
            if isinstance(p.get("text"), str):
                n += count_tokens(p["text"], _ENC)
            for k in ("functionCall", "functionResponse"):
                if isinstance(p.get(k), dict):
                    n += count_tokens(json.dumps(p[k]), _ENC)
    return n


def prompt_tokens(body: JSON) -> int:
    """systemInstruction parts + 3 per content and its parts + json.dumps(tools)."""
    system = body.get("systemInstruction") or body.get("system_instruction")
    n = _parts_tokens(system.get("parts")) if isinstance(system, dict) else 0
    contents = body.get("contents")
    for c in contents if isinstance(contents, list) else []:
        if isinstance(c, dict):
            n += 3 + _parts_tokens(c.get("parts"))
    if body.get("tools"):
        n += count_tokens(json.dumps(body["tools"]), _ENC)
    return n


def plan(model: str, body: JSON, cached: int) -> tuple[Reply, list[str], list[str], bool]:
    """The reply's usage, its thought pieces, its answer pieces, and whether it hit the cap."""
    prompt = prompt_tokens(body)
    gen = _dict(body.get("generationConfig"))
    cap = gen.get("maxOutputTokens")
    length = min(cap, DEFAULT_LENGTH) if isinstance(cap, int) and cap > 0 else DEFAULT_LENGTH
    thinking_cfg = _dict(gen.get("thinkingConfig"))
    thinks = ("2.5" in model or "thinking" in model) and thinking_cfg.get("thinkingBudget") != 0
    seed = _seed(body.get("contents")) ^ zlib.crc32(model.encode())
    thoughts = list(words(seed + 1, _THINK_WORDS)) if thinks else []
    answer = list(words(seed, length))
    t = count_tokens(_joined(tuple(thoughts)), _ENC) if thoughts else 0
    cand = count_tokens(_joined(tuple(answer)), _ENC)
    reply = Reply(model, [], prompt, min(cached, prompt), cand + t, t)
    return reply, thoughts, answer, isinstance(cap, int) and 0 < cap <= DEFAULT_LENGTH


def _usage(reply: Reply, candidates: int, thoughts: int) -> JSON:
    u: JSON = {"promptTokenCount": reply.prompt, "candidatesTokenCount": candidates,
               "totalTokenCount": reply.prompt + candidates + thoughts,
               "promptTokensDetails": [{"modality": "TEXT", "tokenCount": reply.prompt}]}
    if reply.cached:
        u["cachedContentTokenCount"] = reply.cached
        u["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": reply.cached}]
    if thoughts:
        u["thoughtsTokenCount"] = thoughts
    return u


async def generate(sim: Simulator, c: Call) -> None:
    m = PATH.match(c.path)
    assert m is not None   # routed here only when it matches
    model, method = m.group(1), m.group(2)
    b = c.body
    if not isinstance(b.get("contents"), list | str):
        await _plain_json(c.send, 400, {"error": {"code": 400, "message": "contents is required",
                                                  "status": "INVALID_ARGUMENT"}})
        return
    reply, thoughts, answer, capped = plan(model, b, c.knobs.cached)
    tc = _dict(_dict(b.get("generationConfig")).get("thinkingConfig"))
    show_thoughts = tc.get("includeThoughts") is True
    finish = "MAX_TOKENS" if capped else "STOP"
    rid = sim._id("")
    if method == "generateContent":
        parts: list[JSON] = [{"text": _joined(tuple(thoughts)), "thought": True}] if thoughts and show_thoughts else []
        parts.append({"text": _joined(tuple(answer))})
        obj: JSON = {"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish,
                                     "index": 0}],
                     "usageMetadata": _usage(reply, reply.completion - reply.reasoning, reply.reasoning),
                     "modelVersion": model, "responseId": rid}
        if c.knobs.omit_usage:
            del obj["usageMetadata"]
        await sim._answer(c, obj, reply)
        return
    chunks = _chunks(reply, thoughts if show_thoughts else [], answer, finish, rid, c.knobs.omit_usage)
    if b"alt=sse" not in c.query:
        sim.stats.add(reply)
        await sim._json(c, chunks)
        return
    events = [b"data: " + orjson.dumps(ch) + b"\r\n\r\n" for ch in chunks]
    await sim._stream(c, events, reply, done=False)


def _chunks(reply: Reply, thoughts: list[str], answer: list[str], finish: str, rid: str,
            omit_usage: bool) -> list[JSON]:
    """Stream chunks: thoughts (when shown) then the answer a few words at a time; usage cumulative."""
    t = reply.reasoning
    out: list[JSON] = []
    if thoughts:
        out.append({"candidates": [{"content": {"parts": [{"text": _joined(tuple(thoughts)), "thought": True}],
                                                "role": "model"}, "index": 0}]})
    sent = 0
    step = 8
    for i in range(0, len(answer), step):
        piece = answer[i:i + step]
        sent += count_tokens(_joined(tuple(piece)), _ENC)
        cand: JSON = {"content": {"parts": [{"text": _joined(tuple(piece))}], "role": "model"}, "index": 0}
        if i + step >= len(answer):
            cand["finishReason"] = finish
        out.append({"candidates": [cand]})
        out[-1]["usageMetadata"] = _usage(reply, sent, t)
    for ch in out:
        ch.setdefault("usageMetadata", _usage(reply, 0, t))
        ch["modelVersion"] = reply.model
        ch["responseId"] = rid
        if omit_usage:
            del ch["usageMetadata"]
    return out
