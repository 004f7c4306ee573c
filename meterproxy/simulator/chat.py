"""Chat completions: /v1 and /v4 (vendor-prefixed), /v3 (streams by default, async runs and polls)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import orjson

from meterproxy.simulator.plan import Reply, plan_chat
from meterproxy.simulator.tokens import _joined
from meterproxy.simulator.wire import _FINGERPRINT, JSON, MAX_RUNS, Call, Run, _error

if TYPE_CHECKING:
    from meterproxy.simulator.app import Simulator


async def chat(sim: Simulator, c: Call) -> None:
    """/v1 and /v4 chat completions, and /v3 (streaming by default, async runs)."""
    b = c.body
    if not isinstance(b.get("messages"), list):
        await _error(c.send, 400, "'messages' is a required property",
                     "invalid_request_error", "missing_required_parameter", "messages")
        return
    reply = plan_chat(b, c.knobs)
    if c.flavor == "v3" and b.get("async") is True:
        uid = str(uuid.uuid4())
        sim.runs[uid] = Run(_chat_object(sim, reply, c), reply)
        while len(sim.runs) > MAX_RUNS:
            sim.runs.popitem(last=False)
        await sim._json(c, {"uid": uid, "status": "queued"})
        return
    stream = b.get("stream") is not False if c.flavor == "v3" else b.get("stream") is True
    if not stream:
        await sim._answer(c, _chat_object(sim, reply, c), reply)
        return
    opts = b.get("stream_options")
    with_usage = isinstance(opts, dict) and opts.get("include_usage") is True \
        and not c.knobs.omit_usage
    await sim._stream(c, _chat_events(sim, reply, c, with_usage), reply, done=True)

def _vendor(sim: Simulator, c: Call) -> bytes:
    return b',"service_tier":"default"' if c.flavor == "v4" else b""

def _chat_object(sim: Simulator, reply: Reply, c: Call) -> JSON:
    choices = []
    for i, ch in enumerate(reply.choices):
        msg: JSON = {"role": "assistant", "content": _joined(ch.content) if ch.content or
                     not ch.tool_name else None, "refusal": None}
        if ch.reasoning:
            msg["reasoning_content"] = _joined(ch.reasoning)
        if ch.tool_name:
            msg["tool_calls"] = [{"id": ch.tool_id, "type": "function", "function": {
                "name": ch.tool_name, "arguments": _joined(ch.tool_args)}}]
        choices.append({"index": i, "message": msg, "logprobs": None,
                        "finish_reason": ch.finish})
    obj: JSON = {"id": sim._id("chatcmpl-"), "object": "chat.completion",
                 "created": int(time.time()), "model": reply.model, "choices": choices,
                 "system_fingerprint": _FINGERPRINT}
    if c.flavor == "v4":
        obj["service_tier"] = "default"
    if not c.knobs.omit_usage:
        obj["usage"] = reply.usage({"total_time": 0.01})
    return obj

def _chat_events(sim: Simulator, reply: Reply, c: Call, with_usage: bool) -> list[bytes]:
    """Every SSE event of a chat stream, [DONE] excluded; choices interleaved round-robin."""
    head = (b'data: {"id":"' + sim._id("chatcmpl-").encode() +
            b'","object":"chat.completion.chunk","created":' + str(int(time.time())).encode() +
            b',"model":' + orjson.dumps(reply.model) + b',"system_fingerprint":"' +
            _FINGERPRINT.encode() + b'"' + _vendor(sim, c) + b',"choices":[')
    tail = b'],"usage":null}\n\n' if with_usage else b"]}\n\n"
    per_choice: list[list[JSON]] = []
    for ch in reply.choices:
        deltas: list[JSON] = [{"role": "assistant", "content": "", "refusal": None}]
        deltas += [{"reasoning_content": p} for p in ch.reasoning]
        if ch.tool_name:
            deltas.append({"tool_calls": [{"index": 0, "id": ch.tool_id, "type": "function",
                                           "function": {"name": ch.tool_name,
                                                        "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                       for p in ch.tool_args]
        deltas += [{"content": p} for p in ch.content]
        per_choice.append(deltas)
    events: list[bytes] = []
    for step in range(max(len(d) for d in per_choice) + 1):
        for i, deltas in enumerate(per_choice):
            if step < len(deltas):
                choice = {"index": i, "delta": deltas[step], "logprobs": None,
                          "finish_reason": None}
            elif step == len(deltas):
                choice = {"index": i, "delta": {}, "logprobs": None,
                          "finish_reason": reply.choices[i].finish}
            else:
                continue
            events.append(head + orjson.dumps(choice) + tail)
    if with_usage:
        events.append(head + b'],"usage":' +
                      orjson.dumps(reply.usage({"total_time": 0.01})) + b"}\n\n")
    return events

async def poll(sim: Simulator, c: Call) -> None:
    """GET /v3/ai/chat_completion_runs/{uid}: running once, then completed with the result."""
    uid = c.path.rsplit("/", 1)[-1]
    run = sim.runs.get(uid)
    if run is None:
        await _error(c.send, 404, f"No run with uid {uid!r}", "invalid_request_error",
                     "run_not_found")
        return
    run.polls += 1
    if run.polls == 1:
        await sim._json(c, {"uid": uid, "status": "running"})
        return
    if run.polls == 2:
        sim.stats.add(run.reply)    # counted once, when the result is first handed out
    await sim._json(c, {"uid": uid, "status": "completed", "result": run.result})

# -- other endpoints -----------------------------------------------------------------------
