"""Load generators: wrk (C, for request rates) and a small asyncio client (for stream timings).

- `wrk_run`: POSTs a fixed body at a fixed concurrency for a fixed time; a Lua `done` hook prints
  the summary as one JSON line (requests, errors, latency percentiles in microseconds).
- `stream_run`: keep-alive aiohttp connections, each doing streams back to back; per stream it
  records time to the response headers, time to the first body byte (the first SSE event: what
  a user sees as the first token) and the total time.
- `hold_streams`: opens N slow streams at once and keeps them open while a callback measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n@@{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
"""


def wrk_script(path: Path, body_file: Path, headers: dict[str, str]) -> Path:
    """A wrk Lua script that POSTs `body_file` with `headers` and reports JSON when done."""
    lines = ['wrk.method = "POST"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    lines += [f"local f = io.open({json.dumps(str(body_file))}, 'rb')", "wrk.body = f:read('*a')", "f:close()"]
    path.write_text("\n".join(lines) + "\n" + WRK_DONE)
    return path


async def wrk_run(url: str, script: Path, *, connections: int, duration_s: float,
                  cores: str, threads: int = 1) -> dict[str, Any]:
    """Run wrk on `cores`; the summary dict, plus req_s."""
    argv = ["taskset", "-c", cores, "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--timeout", "10s", "-s", str(script), url]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("@@"):
            res: dict[str, Any] = json.loads(line[2:])
            res["req_s"] = res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0
            return res
    raise RuntimeError(f"wrk gave no summary: {out.decode(errors='replace')[-500:]} {err.decode()[-500:]}")


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


@dataclass
class StreamStats:
    """One stream_run: per-stream times in seconds."""

    elapsed: float = 0.0
    errors: int = 0
    bytes: int = 0
    headers: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    first_error: str | None = None

    @property
    def n(self) -> int:
        return len(self.total)

    def summary(self) -> dict[str, Any]:
        ms = 1000.0
        return {
            "streams": self.n, "errors": self.errors, "first_error": self.first_error,
            "streams_s": self.n / self.elapsed if self.elapsed else 0.0,
            "bytes_per_stream": self.bytes / self.n if self.n else 0,
            "ttfb_p50_ms": pct(self.ttfb, 50) * ms, "ttfb_p99_ms": pct(self.ttfb, 99) * ms,
            "headers_p50_ms": pct(self.headers, 50) * ms,
            "p50_ms": pct(self.total, 50) * ms, "p99_ms": pct(self.total, 99) * ms,
        }


def _session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=120),
                                 cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)


async def stream_run(url: str, headers: dict[str, str], body: bytes, *, concurrency: int,
                     duration_s: float, max_streams: int | None = None) -> StreamStats:
    """`concurrency` connections doing streams back to back for `duration_s` (or `max_streams`)."""
    st = StreamStats()
    started = 0
    async with _session() as session:
        end = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal started
            while time.perf_counter() < end and (max_streams is None or started < max_streams):
                started += 1
                t0 = time.perf_counter()
                first = 0.0
                size = 0
                tail = b""
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        t_h = time.perf_counter()
                        async for chunk in resp.content.iter_any():
                            if not first:
                                first = time.perf_counter()
                            size += len(chunk)
                            tail = (tail + chunk)[-32:]
                        t_end = time.perf_counter()
                        if resp.status != 200 or not tail.endswith(b"[DONE]\n\n"):
                            raise RuntimeError(f"status {resp.status}, stream ended with {tail!r}")
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                    st.errors += 1
                    st.first_error = st.first_error or f"{type(exc).__name__}: {exc}"
                    continue
                st.headers.append(t_h - t0)
                st.ttfb.append(first - t0)
                st.total.append(t_end - t0)
                st.bytes += size

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        st.elapsed = time.perf_counter() - t_start
    return st


async def hold_streams(url: str, headers: dict[str, str], body: bytes, n: int,
                       measure: Callable[[int], Awaitable[Any]], open_timeout_s: float = 20.0) -> Any:
    """Open `n` streams at once; once each has delivered its first event (or the timeout passes),
    await `measure(number_open)` while they are all still open, then drop them all."""
    opened = 0
    all_open = asyncio.Event()
    failures: list[str] = []
    async with _session() as session:

        async def one() -> None:
            nonlocal opened
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    first = True
                    async for _ in resp.content.iter_any():
                        if first:
                            first = False
                            opened += 1
                            if opened == n:
                                all_open.set()
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), open_timeout_s)
        result = await measure(opened)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failures:
        result = {**result, "failures": len(failures), "first_failure": failures[0]}
    return result
