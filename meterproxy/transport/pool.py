"""A lean HTTP/1.1 client for the upstream hop, built for exactly what the proxy needs.

Why not aiohttp: under load its ClientSession was the largest single cost in the proxy's profile
(~25% of CPU until response headers at 32 concurrent requests, plus body reading, per-request
timeout handles, ClientRequest/auto-header machinery, StreamWriter). This client does one thing:
send a request head (+ body) in one write on a pooled keep-alive connection, and parse the answer
with httptools (meterproxy/transport/connection.py).

What it does, and deliberately does not:
- one keep-alive pool per origin (scheme, host, port), unbounded (the proxy's own concurrency
  limits bound it, as aiohttp's limit=0 did); idle connections are closed after `keepalive_s` by
  one timer per pool; a connection whose transport is closing is never picked, one the server
  closed while idle is removed when asyncio reports it lost.
- one timer per request for the total timeout (headers and the whole body); connecting (DNS,
  TCP, TLS) is bounded by the connect timeout too.
- no retries of a POST: an LLM call is not idempotent and costs money. A POST sent on a kept-alive
  connection that the server closed at that very moment fails (BrokenStream), as with aiohttp; a
  GET/HEAD/OPTIONS (a run poll) is sent once more on a new connection, as aiohttp did.
- bodies pass byte for byte: no decompression, no Accept-Encoding/User-Agent/Accept added, no
  cookies, no redirects, no proxies from the environment, no Expect: 100-continue.
- request headers are the caller's, in its order, plus Host and Content-Length (when a body is
  given); header bytes are sent as latin-1 (the client's bytes as received).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from itertools import zip_longest
from urllib.parse import urlsplit

from meterproxy.transport.connection import (
    BrokenStream,
    ClosedBeforeAnswer,
    ConnectError,
    Connection,
    DNSError,
    Headers,
    Response,
)

__all__ = ["BrokenStream", "Client", "ConnectError", "DNSError", "Headers", "Response"]

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})  # retried once after a keep-alive race
_DNS_TTL_S = 300.0  # as aiohttp's ttl_dns_cache was
_WRITE_JOIN_MAX = 64 * 1024  # head + body joined into one buffer below this; two buffers above
_Addr = tuple[int, int, str, int]  # family, proto, IP address, port: one getaddrinfo answer


class Pool:
    """Kept-alive connections to one origin. `idle` is ordered by the time each connection went
    idle (appended on the right); requests take from the right (the most recently used, least
    likely to have been closed by the server), the sweep expires from the left."""

    __slots__ = ("client", "conns", "host", "idle", "port", "server_hostname", "ssl", "sweeper")

    def __init__(self, client: Client, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.ssl = ssl_ctx
        self.server_hostname = host if ssl_ctx is not None else None  # SNI and certificate name
        self.idle: deque[Connection] = deque()
        self.conns: set[Connection] = set()  # every open connection, for close()
        self.sweeper: asyncio.TimerHandle | None = None

    def take(self) -> Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            conn.idle = False
            if not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: Connection) -> None:
        loop = self.client.loop
        conn.idle_since = now = loop.time()
        conn.idle = True
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = loop.call_at(now + self.client.keepalive_s, self._sweep)

    def forget(self, conn: Connection) -> None:
        """The connection is gone (asyncio called connection_lost)."""
        self.conns.discard(conn)
        if conn.idle:
            conn.idle = False
            self.idle.remove(conn)

    def _sweep(self) -> None:
        """Close connections idle for keepalive_s; one timer per pool, re-armed for the oldest."""
        self.sweeper = None
        client = self.client
        limit = client.loop.time() - client.keepalive_s
        idle = self.idle
        while idle and idle[0].idle_since <= limit:
            conn = idle.popleft()
            conn.idle = False
            conn.transport.close()
        if idle:
            self.sweeper = client.loop.call_at(idle[0].idle_since + client.keepalive_s, self._sweep)

    async def connect(self, deadline: float) -> Connection:
        """A new connection, within the connect timeout and the request's deadline. Addresses are
        tried in turn (families interleaved, see Client.resolve), each within an equal share of the
        time left, so one black-holed address (say an unroutable IPv6) cannot use up the whole
        connect timeout before the next is tried."""
        client = self.client
        loop = client.loop
        end = min(deadline, loop.time() + client.connect_timeout_s)
        try:
            async with asyncio.timeout_at(end):
                infos = await client.resolve(self.host, self.port)
        except TimeoutError:
            raise TimeoutError(f"resolving {self.host} timed out") from None
        last: OSError | None = None
        for i, (family, proto, ip, port) in enumerate(infos):
            try:
                async with asyncio.timeout((end - loop.time()) / (len(infos) - i)):
                    _, conn = await loop.create_connection(
                        lambda: Connection(self), ip, port, family=family, proto=proto,
                        ssl=self.ssl, server_hostname=self.server_hostname)
            except OSError as exc:  # refused, unreachable, TLS failure, timed out: try the next one
                last = exc
                continue
            self.conns.add(conn)
            return conn
        if isinstance(last, TimeoutError):
            raise TimeoutError(f"connecting to {self.host}:{self.port} timed out") from None
        raise ConnectError(f"cannot connect to {self.host}:{self.port}: {last}") from last

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for conn in self.idle:
            conn.idle = False
        self.idle.clear()
        for conn in list(self.conns):
            conn.abort()


class Client:
    """`await request(...)` returns a Response once its headers are in (see meterproxy/transport/connection.py)."""

    def __init__(self, connect_timeout_s: float = 10.0, keepalive_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._routes: dict[str, tuple[Pool, str]] = {}  # origin as written → pool, Host header
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[_Addr]]] = {}
        self._ssl = ssl_context  # None: the default context, made on the first https origin

    async def request(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                      body: bytes | None, timeout_s: float) -> Response:
        """Send and return once the response headers are in; the caller reads the body, then
        calls release() (read to the end) or close() (abandoned). Raises TimeoutError (the total
        timeout or the connect timeout), ConnectError / DNSError (no connection), BrokenStream
        (the connection broke or the answer is not HTTP)."""
        loop = self.loop
        deadline = loop.time() + timeout_s
        start = url.find("://") + 3
        end = len(url)
        for sep in "/?":
            i = url.find(sep, start)
            if 0 <= i < end:
                end = i
        route = self._routes.get(url[:end])
        if route is None:
            route = self._route(url[:end])
        pool, host = route
        target = url[end:] if url[end:end + 1] == "/" else "/" + url[end:]

        lines = "\r\n".join(map(": ".join, headers))
        head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
        if lines:
            head += lines + "\r\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        head += "\r\n"
        # Header injection guard: every CR and LF must be one of the line ends written above.
        n_lines = 3 + len(headers) + (body is not None)
        if head.count("\n") != n_lines or head.count("\r") != n_lines:
            raise ValueError("CR or LF inside the request line or a request header")
        try:
            data = head.encode("latin-1")  # the client's header bytes exactly as they came in
        except UnicodeEncodeError:
            data = head.encode("utf-8")  # a configured value beyond latin-1 (what aiohttp sent)

        try:
            return await self._exchange(pool, method, data, body, deadline, fresh=False)
        except ClosedBeforeAnswer:
            if method not in _IDEMPOTENT:
                raise
            # A kept-alive connection closed by the provider as we reused it (its idle timeout
            # raced ours). A GET or HEAD (a run poll) is sent once more on a new connection, as
            # aiohttp did; a POST is not: it may have been taken, and an LLM call costs money.
            return await self._exchange(pool, method, data, body, deadline, fresh=True)

    async def _exchange(self, pool: Pool, method: str, data: bytes, body: bytes | None,
                        deadline: float, *, fresh: bool) -> Response:
        """One attempt: send on a pooled connection (a new one if `fresh` or none is idle) and wait
        for the response headers. ClosedBeforeAnswer is raised only for a reused connection."""
        loop = self.loop
        conn = None if fresh else pool.take()
        reused = conn is not None
        if conn is None:
            conn = await pool.connect(deadline)
            if conn.transport.is_closing():  # the server closed it at once (uvloop would raise on write)
                raise BrokenStream("the provider closed the connection before answering")
        resp = Response(loop, conn)
        conn.resp = resp
        conn.head = method == "HEAD"
        resp._timer = loop.call_at(deadline, resp._on_timeout)
        transport = conn.transport
        if not body:
            transport.write(data)
        elif len(body) <= _WRITE_JOIN_MAX:
            transport.write(data + body)
        else:
            transport.writelines((data, body))
        waiter = resp._waiter = loop.create_future()
        try:
            await waiter
        except BaseException:  # cancelled (the client left): nobody will read this answer
            resp.close()
            raise
        if not resp.status:
            exc = resp._exc
            assert exc is not None
            if isinstance(exc, ClosedBeforeAnswer) and not reused:
                raise BrokenStream(str(exc)) from exc   # a new connection: not a keep-alive race
            raise exc
        return resp

    def _route(self, origin: str) -> tuple[Pool, str]:
        parts = urlsplit(origin)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {origin!r}")
        default = 443 if scheme == "https" else 80
        host, port = parts.hostname, parts.port or default
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(self, host, port, self._ssl_context() if scheme == "https" else None)
        host_header = f"[{host}]" if ":" in host else host
        if port != default:
            host_header += f":{port}"
        route = self._routes[origin] = (pool, host_header)
        return route

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # system CAs, hostname checking, SNI
        return self._ssl

    async def resolve(self, host: str, port: int) -> list[_Addr]:
        """getaddrinfo, cached for _DNS_TTL_S (a new connection need not wait for DNS each time)."""
        key = (host, port)
        hit = self._dns.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise DNSError(f"cannot resolve {host}: {exc}") from exc
        if not infos:
            raise DNSError(f"cannot resolve {host}: no addresses")
        addrs: list[_Addr] = [(int(family), proto, str(addr[0]), int(addr[1]))
                              for family, _, proto, _, addr in infos]
        # Interleave address families (RFC 8305 §4): after a failed IPv6 address, try IPv4 next.
        first = [a for a in addrs if a[0] == addrs[0][0]]
        other = [a for a in addrs if a[0] != addrs[0][0]]
        addrs = [a for pair in zip_longest(first, other) for a in pair if a is not None]
        self._dns[key] = (now + _DNS_TTL_S, addrs)
        return addrs

    async def close(self) -> None:
        """Close every connection, idle or in use (a response being read then fails)."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._routes.clear()
