"""Legacy /v1/completions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

from meterproxy.simulator.plan import Choice, Reply, _length
from meterproxy.simulator.tokens import _joined, _seed, count_tokens, encoding_for, words
from meterproxy.simulator.wire import _FINGERPRINT, JSON, Call

if TYPE_CHECKING:
    from meterproxy.simulator.app import Simulator


async def completions(sim: Simulator, c: Call) -> None:
    """Legacy /v1/completions: prompt string or list; n choices per prompt."""
    b = c.body
    model = str(b.get("model") or "gpt-3.5-turbo-instruct")
    enc = encoding_for(model)
    raw = b.get("prompt", "")
    prompts = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    length, capped = _length(b, "max_tokens")
    if c.knobs.chunks:
        length, capped = c.knobs.chunks, False
    n = b["n"] if isinstance(b.get("n"), int) and b["n"] > 1 else 1
    reply = Reply(model, [], 0, 0)
    for p in prompts:
        reply.prompt += count_tokens(p, enc) if isinstance(p, str) else \
            len(p) if isinstance(p, list) else 0
        for j in range(min(n, 128)):
            pieces = words(_seed(p) + j * 7919, length)
            reply.choices.append(Choice((), pieces, finish="length" if capped else "stop"))
            reply.completion += count_tokens(_joined(pieces), enc)
    reply.cached = min(c.knobs.cached, reply.prompt)
    usage = {"prompt_tokens": reply.prompt, "completion_tokens": reply.completion,
             "total_tokens": reply.prompt + reply.completion}
    cid, created = sim._id("cmpl-"), int(time.time())
    if b.get("stream") is not True:
        obj: JSON = {"id": cid, "object": "text_completion", "created": created,
                     "model": model, "system_fingerprint": _FINGERPRINT, "choices": [
                         {"text": _joined(ch.content), "index": i, "logprobs": None,
                          "finish_reason": ch.finish} for i, ch in enumerate(reply.choices)]}
        if not c.knobs.omit_usage:
            obj["usage"] = usage
        await sim._answer(c, obj, reply)
        return
    opts = b.get("stream_options")
    with_usage = isinstance(opts, dict) and opts.get("include_usage") is True \
        and not c.knobs.omit_usage
    head = (b'data: {"id":"' + cid.encode() + b'","object":"text_completion","created":' +
            str(created).encode() + b',"model":' + orjson.dumps(model) +
            b',"system_fingerprint":"' + _FINGERPRINT.encode() + b'","choices":[')
    tail = b'],"usage":null}\n\n' if with_usage else b"]}\n\n"
    events = [head + orjson.dumps({"text": piece, "index": i, "logprobs": None,
                                   "finish_reason": None}) + tail
              for i, ch in enumerate(reply.choices) for piece in ch.content]
    events += [head + orjson.dumps({"text": "", "index": i, "logprobs": None,
                                    "finish_reason": ch.finish}) + tail
               for i, ch in enumerate(reply.choices)]
    if with_usage:
        events.append(head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n")
    await sim._stream(c, events, reply, done=True)
