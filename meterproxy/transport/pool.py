"""The client: one keep-alive pool per origin, connecting (directly, through an egress proxy's
CONNECT tunnel, with the provider's TLS settings) and writing requests. What it supports and
what it does not: see meterproxy/transport/__init__.py."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from itertools import zip_longest

from meterproxy.transport.connection import Connection, Response
from meterproxy.transport.errors import (
    BrokenStream,
    ClosedBeforeAnswer,
    DNSError,
    TransportError,
    map_exceptions,
)
from meterproxy.transport.origin import Origin, TLSFiles
from meterproxy.transport.proxy import Proxies, ProxyURL, open_tunnel

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})  # retried once after a keep-alive race
_DNS_TTL_S = 300.0  # as aiohttp's ttl_dns_cache was
_WRITE_JOIN_MAX = 64 * 1024  # head + body joined into one buffer below this; two buffers above
_NO_IDLE = float("inf")
_Addr = tuple[int, int, str, int]  # family, proto, IP address, port: one getaddrinfo answer


class Pool:
    """Kept-alive connections to one origin. `idle` is ordered by the time each connection went
    idle (appended on the right); requests take from the right (the most recently used, least
    likely to have been closed by the server), the sweep expires from the left."""

    __slots__ = ("client", "conns", "head_prefix", "idle", "origin", "proxy", "ssl", "sweeper",
                 "target_prefix")

    def __init__(self, client: Client, origin: Origin, ssl_ctx: ssl.SSLContext | None,
                 proxy: ProxyURL | None) -> None:
        self.client = client
        self.origin = origin
        self.ssl = ssl_ctx
        self.proxy = proxy
        # Request line and head, precomputed: absolute-form targets and Proxy-Authorization for
        # an http origin behind HTTP_PROXY; https goes through a tunnel and needs neither.
        forward = proxy is not None and ssl_ctx is None
        self.target_prefix = (b"http://" + origin.host_header if forward else b"") + origin.base_path
        self.head_prefix = b"Host: " + origin.host_header + b"\r\n"
        if forward and proxy is not None and proxy.auth is not None:
            self.head_prefix += b"Proxy-Authorization: " + proxy.auth + b"\r\n"
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
        origin = self.origin
        host, port = (self.proxy.host, self.proxy.port) if self.proxy else (origin.host, origin.port)
        end = min(deadline, loop.time() + client.connect_timeout_s)
        with map_exceptions(f"resolving {host}"):
            async with asyncio.timeout_at(end):
                infos = await client.resolve(host, port)
        last: TransportError | None = None
        for i, (family, proto, ip, port) in enumerate(infos):
            try:
                with map_exceptions(f"connecting to {host}:{port}"):
                    async with asyncio.timeout((end - loop.time()) / (len(infos) - i)):
                        conn = await self._open(ip, port, family, proto)
            except TransportError as exc:  # refused, unreachable, TLS, timed out: try the next one
                last = exc
                continue
            self.conns.add(conn)
            return conn
        assert last is not None
        raise last

    async def _open(self, ip: str, port: int, family: int, proto: int) -> Connection:
        loop = self.client.loop
        origin = self.origin
        if self.proxy is None or self.ssl is None:  # direct, or plain http through HTTP_PROXY
            _, conn = await loop.create_connection(
                lambda: Connection(self), ip, port, family=family, proto=proto, ssl=self.ssl,
                server_hostname=origin.host if self.ssl is not None else None)
            return conn
        raw = await open_tunnel(loop, self.proxy, ip, port, family, origin)
        conn = Connection(self)
        try:
            tls = await loop.start_tls(raw, conn, self.ssl, server_hostname=origin.host)
        except BaseException:
            raw.abort()
            raise
        assert tls is not None
        conn.connection_made(tls)  # start_tls does not call it
        return conn

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
    """`await request(...)` returns a Response once its headers are in (see connection.py).
    Made inside the running loop (the app's lifespan); `proxies` are read once, at startup."""

    def __init__(self, connect_timeout_s: float = 10.0, keepalive_s: float = 30.0,
                 proxies: Proxies | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.proxies = Proxies() if proxies is None else proxies
        self._pools: dict[Origin, Pool] = {}
        self._ssl: dict[TLSFiles, ssl.SSLContext] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[_Addr]]] = {}

    async def request(self, origin: Origin, method: str, target: bytes,
                      headers: Sequence[tuple[bytes, bytes]], body: bytes | None,
                      timeout_s: float, idle_s: float | None = None) -> Response:
        """Send and return once the response headers are in; the caller reads the body, then
        calls release() (read to the end) or close() (abandoned). `target` is the path and query
        (it starts with /); `idle_s` cuts an answer that sends no byte for that long. Raises only
        TransportError subclasses (ProxyErrors carrying their metric kind)."""
        loop = self.loop
        deadline = loop.time() + timeout_s
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pool(origin)
        parts = [method.encode("ascii"), b" ", pool.target_prefix, target, b" HTTP/1.1\r\n",
                 pool.head_prefix]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body is not None:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        data = b"".join(parts)
        # Header injection guard: every CR and LF must be one of the line ends written above.
        n_lines = 2 + pool.head_prefix.count(b"\n") + len(headers) + (body is not None)
        if data.count(b"\n") != n_lines or data.count(b"\r") != n_lines:
            raise ValueError("CR or LF inside the request line or a request header")

        idle = _NO_IDLE if idle_s is None else idle_s
        try:
            return await self._exchange(pool, method, data, body, deadline, idle, fresh=False)
        except ClosedBeforeAnswer:
            if method not in _IDEMPOTENT:
                raise
            # A kept-alive connection closed by the provider as we reused it (its idle timeout
            # raced ours). A GET or HEAD (a run poll) is sent once more on a new connection, as
            # aiohttp did; a POST is not: it may have been taken, and an LLM call costs money.
            return await self._exchange(pool, method, data, body, deadline, idle, fresh=True)

    async def _exchange(self, pool: Pool, method: str, data: bytes, body: bytes | None,
                        deadline: float, idle_s: float, *, fresh: bool) -> Response:
        """One attempt: send on a pooled connection (a new one if `fresh` or none is idle) and wait
        for the response headers. ClosedBeforeAnswer is raised only for a reused connection."""
        loop = self.loop
        conn = None if fresh else pool.take()
        reused = conn is not None
        if conn is None:
            conn = await pool.connect(deadline)
            if conn.transport.is_closing():  # the server closed it at once (uvloop would raise on write)
                raise BrokenStream("the provider closed the connection before answering")
        resp = Response(loop, conn, deadline, idle_s)
        conn.resp = resp
        conn.head = method == "HEAD"
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

    def _pool(self, origin: Origin) -> Pool:
        ctx = None
        if origin.tls is not None:
            ctx = self._ssl.get(origin.tls)
            if ctx is None:
                ctx = self._ssl[origin.tls] = origin.tls.context()
        pool = self._pools[origin] = Pool(self, origin, ctx, self.proxies.for_origin(origin))
        return pool

    async def resolve(self, host: str, port: int) -> list[_Addr]:
        """getaddrinfo, cached for _DNS_TTL_S (a new connection need not wait for DNS each time)."""
        key = (host, port)
        hit = self._dns.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # gaierror: DNSError
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
