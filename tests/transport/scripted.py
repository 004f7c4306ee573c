"""A scripted asyncio HTTP server and request helpers for the transport tests."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable

from meterproxy.transport import Client, Origin, Response, TLSFiles

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[["Request", Reader, Writer], Awaitable[None]]

class Request:
    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, _ = lines[0].split(" ")
        self.headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]


async def read_request(reader: Reader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return Request(head, body)


class Server:
    """Answers each request on a connection with `handler` until it returns False-ish behaviour
    (closes the writer) or the client leaves. Counts connections; records requests and EOFs."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.accepted = 0
        self.requests: list[Request] = []
        self.eofs = 0  # connections the client closed
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _conn(self, reader: Reader, writer: Writer) -> None:
        self.accepted += 1
        try:
            while not writer.is_closing():
                req = await read_request(reader)
                if req is None:
                    self.eofs += 1
                    self.eof.set()
                    return
                self.requests.append(req)
                await self.handler(req, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.eofs += 1
            self.eof.set()
        finally:
            writer.close()


def answer(raw: bytes) -> Handler:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(raw)
        await writer.drain()
    return handler


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello"


async def request(client: Client, method: str, url: str, headers: list[tuple[str, str]],
                  body: bytes | None, timeout: float, tls: TLSFiles | None = None,
                  idle_s: float | None = None) -> Response:
    """The client's request, from a URL (the proxy resolves origins once, at config load)."""
    start = url.find("://") + 3
    i = min((j for j in (url.find("/", start), url.find("?", start)) if j >= 0), default=len(url))
    base, target = url[:i], url[i:]
    target = target if target.startswith("/") else "/" + target
    origin = Origin.parse(base, tls)
    return await client.request(origin, method, target.encode("latin-1"),
                                [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                                body, timeout, idle_s)


async def get(client: Client, url: str, method: str = "GET", body: bytes | None = None,
              timeout: float = 5.0, headers: list[tuple[str, str]] | None = None,
              tls: TLSFiles | None = None) -> tuple[Response, bytes]:
    resp = await request(client, method, url, headers or [], body, timeout, tls)
    data = await resp.read()
    resp.release()
    return resp, data


async def wait_until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class ConnectProxy:
    """A minimal HTTP CONNECT proxy: records each CONNECT (target, Proxy-Authorization), answers
    `status`, and on 200 pipes bytes both ways."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.connects: list[tuple[str, str | None]] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _conn(self, reader: Reader, writer: Writer) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ")
            auth = next((line.split(": ", 1)[1] for line in head[1:]
                         if line.lower().startswith("proxy-authorization:")), None)
            self.connects.append((f"{method} {target}", auth))
            if self.status != 200:
                writer.write(b"HTTP/1.1 %d Forbidden\r\nContent-Length: 0\r\n\r\n" % self.status)
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def pipe(r: Reader, w: Writer) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                w.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
