"""/v1/embeddings."""

from __future__ import annotations

import base64
import functools
import struct
from typing import TYPE_CHECKING, Any

from meterproxy.simulator.plan import Reply
from meterproxy.simulator.tokens import _seed, count_tokens, encoding_for
from meterproxy.simulator.wire import JSON, Call

if TYPE_CHECKING:
    from meterproxy.simulator.app import Simulator


async def embeddings(sim: Simulator, c: Call) -> None:
    """/v1/embeddings: 8 deterministic floats per input; base64 if asked (the SDK default)."""
    b = c.body
    model = str(b.get("model") or "text-embedding-3-small")
    enc = encoding_for(model)
    raw = b.get("input", "")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    as_b64 = b.get("encoding_format") == "base64"
    data, tokens = [], 0
    for i, item in enumerate(inputs):
        tokens += count_tokens(item, enc) if isinstance(item, str) else \
            len(item) if isinstance(item, list) else 0
        vec = _vector(_seed(item))
        emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if as_b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    reply = Reply(model, [], tokens, 0)
    sim.stats.add(reply)
    obj: JSON = {"object": "list", "data": data, "model": model}
    if not c.knobs.omit_usage:
        obj["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    await sim._json(c, obj)


@functools.lru_cache(maxsize=4096)
def _vector(seed: int) -> list[float]:
    x, out = seed & 0x7FFFFFFF, []
    for _ in range(8):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(round(x / 0x3FFFFFFF - 1.0, 6))
    return out
