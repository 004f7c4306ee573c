"""/v1/responses, JSON and its event stream."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from meterproxy.simulator.plan import plan_chat
from meterproxy.simulator.tokens import _joined, count_tokens, encoding_for
from meterproxy.simulator.wire import JSON, Call

if TYPE_CHECKING:
    from meterproxy.simulator.app import Simulator


async def responses(sim: Simulator, c: Call) -> None:
    """/v1/responses: a text message (after a reasoning item for reasoning models)."""
    b = c.body
    raw = b.get("input", "")
    messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else \
        raw if isinstance(raw, list) else []
    if isinstance(b.get("instructions"), str):
        messages = [{"role": "system", "content": b["instructions"]}, *messages]
    chat_body: JSON = {"model": b.get("model") or "gpt-4o", "messages": messages,
                       "reasoning_effort": (b.get("reasoning") or {}).get("effort")
                       if isinstance(b.get("reasoning"), dict) else None}
    if isinstance(b.get("max_output_tokens"), int):
        chat_body["max_tokens"] = b["max_output_tokens"]
    reply = plan_chat(chat_body, c.knobs, n=1)
    if b.get("tools"):    # counted in the prompt; the simulator answers responses in text only
        reply.prompt += count_tokens(json.dumps(b["tools"]), encoding_for(reply.model))
        reply.cached = min(c.knobs.cached, reply.prompt)
    ch = reply.choices[0]
    rid, mid, created = sim._id("resp_"), sim._id("msg_"), int(time.time())
    text = _joined(ch.content)
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}
    output: list[JSON] = [item]
    if ch.reasoning:
        output.insert(0, {"id": sim._id("rs_"), "type": "reasoning", "summary": []})
    usage = {"input_tokens": reply.prompt,
             "input_tokens_details": {"cached_tokens": reply.cached},
             "output_tokens": reply.completion,
             "output_tokens_details": {"reasoning_tokens": reply.reasoning},
             "total_tokens": reply.prompt + reply.completion}
    resp: JSON = {"id": rid, "object": "response", "created_at": created,
                  "status": "completed", "model": reply.model, "output": output,
                  "usage": usage}
    if c.knobs.omit_usage:
        del resp["usage"]
    if b.get("stream") is not True:
        await sim._answer(c, resp, reply)
        return
    await sim._stream(c, _response_events(resp, item, ch.content), reply, done=False)


def _response_events(resp: JSON, item: JSON, pieces: Sequence[str]) -> list[bytes]:
    """The Responses API event stream for a finished `resp` whose message is `item`."""
    seq = itertools.count()
    oi = len(resp["output"]) - 1
    mid = item["id"]
    text = item["content"][0]["text"]

    def ev(kind: str, **fields: Any) -> bytes:
        payload = orjson.dumps({"type": kind, "sequence_number": next(seq), **fields})
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    pending = {**resp, "status": "in_progress", "output": [], "usage": None}
    events = [ev("response.created", response=pending),
              ev("response.in_progress", response=pending)]
    for i, out in enumerate(resp["output"][:-1]):     # the reasoning item, when there is one
        events += [ev("response.output_item.added", output_index=i, item=out),
                   ev("response.output_item.done", output_index=i, item=out)]
    loc = {"item_id": mid, "output_index": oi, "content_index": 0}
    empty = {"type": "output_text", "text": "", "annotations": []}
    events += [ev("response.output_item.added", output_index=oi,
                  item={**item, "status": "in_progress", "content": []}),
               ev("response.content_part.added", **loc, part=empty)]
    events += [ev("response.output_text.delta", **loc, delta=p) for p in pieces]
    events += [ev("response.output_text.done", **loc, text=text),
               ev("response.content_part.done", **loc, part=item["content"][0]),
               ev("response.output_item.done", output_index=oi, item=item),
               ev("response.completed", response=resp)]
    return events

