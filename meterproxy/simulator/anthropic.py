"""Anthropic Messages, POST /v1/messages: JSON, and SSE (message_start, content_block_start /
delta / stop, ping, message_delta with cumulative output_tokens, message_stop).

Usage as Anthropic reports it: `input_tokens` excludes cache reads and writes (knobs
x-sim-cached-tokens and x-sim-cache-write-tokens take them out of the prompt); `output_tokens`
includes thinking, which Anthropic does not count apart.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any

import orjson

from meterproxy.simulator.plan import DEFAULT_LENGTH, Reply, _pick_tool, _tool_args
from meterproxy.simulator.tokens import _joined, _message_tokens, _seed, count_tokens, words
from meterproxy.simulator.wire import JSON, Call, _plain_json

if TYPE_CHECKING:
    from meterproxy.simulator.app import Simulator

_ENC = "o200k_base"
_THINK_WORDS = 16


def prompt_tokens(body: JSON) -> int:
    """system (string or text blocks) + 3 per message and its text + json.dumps(tools)."""
    system = body.get("system")
    n = count_tokens(system, _ENC) if isinstance(system, str) else sum(
        count_tokens(b["text"], _ENC) for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)
    ) if isinstance(system, list) else 0
    messages = body.get("messages")
    n += sum(_message_tokens(m, _ENC) for m in messages) if isinstance(messages, list) else 0
    if body.get("tools"):
        n += count_tokens(json.dumps(body["tools"]), _ENC)
    return n


def _error(c: Call, status: int, message: str) -> Any:
    return _plain_json(c.send, status, {"type": "error", "error": {"type": "invalid_request_error",
                                                                   "message": message}})


def plan(body: JSON, cached: int, cache_write: int) -> tuple[Reply, list[JSON], str]:
    """The reply's usage, its content blocks and its stop reason."""
    model = str(body.get("model") or "claude-sonnet-4-5")
    prompt = prompt_tokens(body)
    read = min(cached, prompt)
    write = min(cache_write, prompt - read)
    max_tokens = body["max_tokens"]
    seed = _seed(body.get("messages")) ^ zlib.crc32(model.encode())
    blocks: list[JSON] = []
    out = 0
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        text = _joined(words(seed + 1, _THINK_WORDS))
        blocks.append({"type": "thinking", "thinking": text, "signature": f"sig{seed & 0xFFFF:04x}"})
        out += count_tokens(text, _ENC)
    tool = _pick_tool(body.get("tools"), body.get("tool_choice"))
    if tool is not None:
        args = _joined(_tool_args(tool[1], seed))
        blocks.append({"type": "tool_use", "id": f"toolu_{seed & 0xFFFFFFFF:08x}", "name": tool[0],
                       "input": json.loads(args)})
        out += count_tokens(args, _ENC) + count_tokens(tool[0], _ENC)
        stop = "tool_use"
    else:
        length = min(max_tokens, DEFAULT_LENGTH) if isinstance(max_tokens, int) else DEFAULT_LENGTH
        text = _joined(words(seed, max(length, 1)))
        blocks.append({"type": "text", "text": text})
        out += count_tokens(text, _ENC)
        stop = "max_tokens" if isinstance(max_tokens, int) and max_tokens <= DEFAULT_LENGTH else "end_turn"
    reply = Reply(model, [], prompt, read, out, 0, write)
    return reply, blocks, stop


def usage(reply: Reply) -> JSON:
    return {"input_tokens": reply.prompt - reply.cached - reply.cache_write,
            "cache_creation_input_tokens": reply.cache_write,
            "cache_read_input_tokens": reply.cached, "output_tokens": reply.completion,
            "service_tier": "standard"}


async def messages(sim: Simulator, c: Call) -> None:
    b = c.body
    if not isinstance(b.get("messages"), list):
        await _error(c, 400, "messages: Field required")
        return
    if not isinstance(b.get("max_tokens"), int):
        await _error(c, 400, "max_tokens: Field required")
        return
    reply, blocks, stop = plan(b, c.knobs.cached, c.knobs.cache_write)
    msg: JSON = {"id": sim._id("msg_"), "type": "message", "role": "assistant", "model": reply.model,
                 "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage(reply)}
    if c.knobs.omit_usage:
        del msg["usage"]
    if b.get("stream") is not True:
        await sim._answer(c, msg, reply)
        return
    await sim._stream(c, events(msg, reply, omit_usage=c.knobs.omit_usage), reply, done=False)


def _ev(kind: str, obj: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


def _pieces(text: str, n: int = 4) -> list[str]:
    step = max(len(text) // n, 1)
    return [text[i:i + step] for i in range(0, len(text), step)]


def events(msg: JSON, reply: Reply, omit_usage: bool = False) -> list[bytes]:
    start_usage = {**usage(reply), "output_tokens": 1}
    head = {k: v for k, v in msg.items() if k != "usage"} | {"content": [], "stop_reason": None}
    if not omit_usage:
        head["usage"] = start_usage
    out = [_ev("message_start", {"message": head}), _ev("ping", {})]
    for i, block in enumerate(msg["content"]):
        kind = block["type"]
        if kind == "thinking":
            out.append(_ev("content_block_start", {"index": i, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}}))
            out += [_ev("content_block_delta", {"index": i, "delta": {"type": "thinking_delta", "thinking": p}})
                    for p in _pieces(block["thinking"])]
            out.append(_ev("content_block_delta", {"index": i, "delta": {
                "type": "signature_delta", "signature": block["signature"]}}))
        elif kind == "tool_use":
            out.append(_ev("content_block_start", {"index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}))
            out += [_ev("content_block_delta", {"index": i, "delta": {"type": "input_json_delta",
                                                                      "partial_json": p}})
                    for p in _pieces(orjson.dumps(block["input"]).decode())]
        else:
            out.append(_ev("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}))
            out += [_ev("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": p}})
                    for p in _pieces(block["text"])]
        out.append(_ev("content_block_stop", {"index": i}))
    delta: JSON = {"delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None}}
    if not omit_usage:
        delta["usage"] = {"output_tokens": reply.completion}
    out += [_ev("message_delta", delta), _ev("message_stop", {})]
    return out
