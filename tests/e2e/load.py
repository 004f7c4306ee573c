"""Load and inspection helpers for the reliability, hostile-input and security tests (issue #7).

A mixed workload of real requests (aiohttp, many at once), ledger reads through the admin API, the
simulator's own totals, Prometheus samples and process RSS — everything read over sockets or from
/proc, so the tests see the proxy exactly as an operator would.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import psutil

from tests.e2e.cluster import ADMIN_KEY, KEYS

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "Tell me about rivers and stones."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
USAGE_FIELDS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")


@dataclass(frozen=True)
class Shape:
    """One kind of request in the mix: path, body, extra headers, and whether it streams."""

    path: str
    body: dict[str, Any]
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)
    key_header: str = "Authorization"


def mixed_shapes(chunks: int = 12) -> list[Shape]:
    """Every metered flavor, streamed and not, with usage asked for or injected, n > 1, tools,
    reasoning and cached tokens: the mix whose ledger totals must equal the simulator's."""
    sim = {"x-sim-chunks": str(chunks)}
    return [
        Shape("/v1/chat/completions", {"model": "gpt-5.4", "messages": MSG, "stream": True}, True, sim),
        Shape("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG, "stream": True,
                                       "stream_options": {"include_usage": True}, "n": 2}, True, sim),
        Shape("/v1/chat/completions", {"model": "gpt-5.4", "messages": MSG, "stream": True,
                                       "tools": TOOLS}, True, {**sim, "x-sim-cached-tokens": "5"}),
        Shape("/v1/chat/completions", {"model": "o4-mini", "messages": MSG, "max_tokens": 8}, False),
        Shape("/v4/beta/chat/completions", {"model": "openai/gpt-4o", "messages": MSG, "stream": True},
              True, sim, key_header="x-api-key"),
        Shape("/v3/ai/chat_completion", {"model": "gpt-5.4", "messages": MSG}, True, sim),
        Shape("/v1/completions", {"model": "gpt-4o-mini", "prompt": "Rivers", "stream": True}, True, sim),
        Shape("/v1/responses", {"model": "gpt-5.4", "input": "Stones", "stream": True}, True, sim),
        Shape("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a b c", "d e"]}, False),
    ]


def key_headers(key_id: str, shape: Shape) -> dict[str, str]:
    secret = KEYS[key_id][1]
    auth = {"x-api-key": secret} if shape.key_header == "x-api-key" else {"Authorization": f"Bearer {secret}"}
    return {**auth, **shape.headers}


@dataclass
class Result:
    """What the client saw for one request."""

    request_id: str
    base: str
    status: int = 0
    body: bytes = b""
    error: str | None = None     # a transport error before any response status arrived


async def one(session: aiohttp.ClientSession, base: str, shape: Shape, key_id: str,
              request_id: str) -> Result:
    """Send one request and read the whole answer; a stream must end with its terminator."""
    res = Result(request_id, base)
    headers = {**key_headers(key_id, shape), "x-request-id": request_id}
    try:
        async with session.post(base + shape.path, json=shape.body, headers=headers) as r:
            res.status = r.status
            res.body = await r.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def stream_complete(shape: Shape, body: bytes) -> bool:
    """Did a 200 answer arrive whole? Chat/completions streams end in [DONE], Responses in
    response.completed, JSON answers parse."""
    if shape.path.endswith("/responses") and shape.stream:
        return b"response.completed" in body[-4096:]
    if shape.stream:
        return body.endswith(b"data: [DONE]\n\n")
    return body.startswith(b"{") and body.rstrip().endswith(b"}")


async def run_load(bases: Sequence[str] | Callable[[int], str], total: int, concurrency: int,
                   shapes: Sequence[Shape] | None = None, prefix: str = "r",
                   on_done: Callable[[int], Awaitable[None] | None] | None = None,
                   retry_refused: Callable[[Result], str | None] | None = None,
                   ) -> list[tuple[Shape, Result]]:
    """`total` requests at `concurrency`, round-robin over bases, shapes and keys.

    `on_done(n)` is called after each completed request (for fault injection at a given point);
    `retry_refused(result)` may name another base to resend a request that got no answer at all
    (what a load balancer does when a backend stops accepting)."""
    shapes = list(shapes or mixed_shapes())
    keys = list(KEYS)
    counter = itertools.count()
    done = 0
    out: list[tuple[Shape, Result]] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)

    def base_for(i: int) -> str:
        return bases(i) if callable(bases) else bases[i % len(bases)]

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal done
            while (i := next(counter)) < total:
                shape = shapes[i % len(shapes)]
                key = keys[(i // len(shapes)) % len(keys)]
                rid = f"{prefix}-{i}"
                res = await one(session, base_for(i), shape, key, rid)
                while res.error is not None and retry_refused is not None:
                    other = retry_refused(res)
                    if other is None:
                        break
                    res = await one(session, other, shape, key, rid)
                out.append((shape, res))
                done += 1
                if on_done is not None:
                    maybe = on_done(done)
                    if maybe is not None:
                        await maybe

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def sim_stats(sim_base: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{sim_base}/_sim/stats").json()
    return stats


def ledger_total(base: str, **params: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/admin/usage", headers=ADMIN, params=params, timeout=30)
    r.raise_for_status()
    total: dict[str, Any] = r.json()["total"]
    return total


def ledger_records(base: str) -> list[dict[str, Any]]:
    """Every ledger record, oldest first (all pages)."""
    out: list[dict[str, Any]] = []
    since = ""
    while True:
        r = httpx.get(f"{base}/admin/usage/records", headers=ADMIN,
                      params={"since_id": since, "limit": "10000"}, timeout=30)
        r.raise_for_status()
        page = r.json()
        out += page["records"]
        if not page["records"]:
            return out
        since = page["next_since_id"]


def record_for(base: str, request_id: str) -> dict[str, Any] | None:
    """The ledger record of one request (the newest one with that id), or None."""
    found = [r for r in ledger_records(base) if r["request_id"] == request_id]
    return found[-1] if found else None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metric(base: str, name: str, labels: dict[str, str] | None = None,
           headers: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    text = httpx.get(f"{base}/metrics", headers=headers or {}, timeout=10).text
    return metric_in(text, name, labels)


def metric_in(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        lbl = m.group(2) or ""
        if all(f'{k}="{v}"' in lbl for k, v in (labels or {}).items()):
            total += float(m.group(3))
    return total


def rss_mb(pid: int) -> float:
    """Resident set size of a process and its children (uvicorn workers), in MiB."""
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    return sum(q.memory_info().rss for q in procs) / 2**20


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll `pred` until true; returns the seconds it took, fails with `what` on timeout."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
