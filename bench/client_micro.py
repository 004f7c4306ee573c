"""The upstream hop alone: client CPU per request of meterproxy/transport/pool.py against aiohttp (set up
as meterproxy's Upstream used it before), both against a trivial uvloop HTTP server in another
process on core 1, the client on core 0. Non-stream POSTs, ~1 KB request and response, c=32.

    .venv/bin/python bench/client_micro.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

BODY = (b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"'
        + b"a" * 400 + b'"}}],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}')
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-request-id: abc\r\n"
            b"openai-processing-ms: 12\r\nx-ratelimit-limit-requests: 9999\r\n"
            b"date: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n" % len(BODY)) + BODY
REQUEST = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"x" * 900 + b'"}]}'
HEADERS = [("content-type", "application/json"), ("accept", "application/json"),
           ("user-agent", "OpenAI/Python 1.40"), ("x-stainless-lang", "python"),
           ("x-forwarded-for", "127.0.0.1"), ("x-request-id", "req-123"),
           ("authorization", "Bearer sk-provider-secret")]


class _Server(asyncio.Protocol):
    """Answers every request (head + Content-Length body) with RESPONSE."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            assert self.transport is not None
            self.transport.write(RESPONSE)


def serve(port: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})

    async def main() -> None:
        await asyncio.get_running_loop().create_server(_Server, "127.0.0.1", port)
        await asyncio.sleep(3600)

    uvloop.run(main())


async def run_h1(url: str, n: int, c: int) -> None:
    from meterproxy.transport import Client, Origin

    client = Client()
    base, _, path = url.partition("/v1/")
    origin, target = Origin.parse(base), ("/v1/" + path).encode()
    headers = [(k.encode(), v.encode()) for k, v in HEADERS]

    async def worker(k: int) -> None:
        for _ in range(k):
            r = await client.request(origin, "POST", target, headers, REQUEST, 30)
            r.header(b"content-type")
            await r.read()
            r.release()

    await asyncio.gather(*(worker(n // c) for _ in range(c)))
    await client.close()


async def run_aiohttp(url: str, n: int, c: int) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30,
                                     family=socket.AF_UNSPEC)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                    cookie_jar=aiohttp.DummyCookieJar(),
                                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))

    async def worker(k: int) -> None:
        for _ in range(k):
            timeout = aiohttp.ClientTimeout(total=30, sock_connect=10)
            r = await session.request("POST", url, headers=HEADERS, data=REQUEST, timeout=timeout,
                                      allow_redirects=False, compress=None, auto_decompress=False)
            r.headers.get("Content-Type", "")
            await r.read()
            r.release()

    await asyncio.gather(*(worker(n // c) for _ in range(c)))
    await session.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    time.sleep(1.0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {0})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    clients: dict[str, Callable[[str, int, int], Awaitable[None]]] = {"h1client": run_h1, "aiohttp": run_aiohttp}
    try:
        for rnd in range(a.rounds):
            for name, fn in clients.items():
                uvloop.run(fn(url, 2000, 32))  # warm: connections, imports
                t0, w0 = time.process_time(), time.perf_counter()
                uvloop.run(fn(url, a.requests, 32))
                cpu, wall = time.process_time() - t0, time.perf_counter() - w0
                print(f"round {rnd + 1} {name:9s} {cpu / a.requests * 1e6:6.1f} µs CPU/request "
                      f"{a.requests / wall:8,.0f} req/s")
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    main()
