"""WireRedis: a small pipelined asyncio client for one Redis node, for the proxy's hot path.

Why not redis-py's asyncio client: per command it checks a connection out of a pool, wraps the
send in a `wait_for` Task (socket_timeout), the read in an `asyncio.timeout`, and packs and parses
in Python: 55-80 µs of CPU per command at concurrency 16, more alone (bench/redis_client_micro.py).
Here every command is packed by hiredis, written on a single shared connection, and
answered in order (Redis answers a connection's commands in the order it received them), so the
replies are matched FIFO to a deque of waiting futures. No Task, no pool, no per-command timer.

- Writes: commands sent in one pass of the event loop go out in one write (one syscall for a dozen
  admissions under load; measured -27% client CPU per admit+settle pair at concurrency 16).
- Timeouts: each command has a deadline `timeout_s` after it is sent; one timer per connection
  watches the oldest. A late reply makes the connection unusable (the next reply would go to the
  wrong caller), so a timeout closes it and fails every pending command with TimeoutError; the
  next command reconnects. Nothing is retried: a timed-out script may have committed. (An overdue
  command is looked at again after one socket poll, so a stall of this process is not taken for
  a slow server.)
- Connection loss fails every pending command with ConnectionError; the next command reconnects
  (callers arriving meanwhile share the one attempt). A refused connect fails at once.
- A cancelled caller's reply is still read, in its turn, and dropped.
- Errors are redis-py's exception classes, mapped from the reply as redis-py does, so callers
  written against redis-py (`except NoScriptError`, `RedisError`) keep working.

Not supported: pub/sub, MULTI/WATCH on a shared connection, RESP3, Redis Cluster (use redis-py's
RedisCluster), and a connection shared across event loops (it belongs to the loop it opened on).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Arg", "WireRedis"]

Arg = str | bytes | int | float
# hiredis's stub declares a 1-tuple; it packs a tuple of any length into one RESP command
_pack: Callable[[tuple[Arg, ...]], bytes] = hiredis.pack_command  # type: ignore[assignment]
_MORE: Any = object()   # what hiredis.Reader.gets() returns until a whole reply has arrived
_SLACK_S = 0.001        # a timer may fire up to the clock's resolution early
_URL_OPTIONS = {"db", "username", "password", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile",
                "ssl_keyfile", "ssl_check_hostname"}


class _Call:
    """A command (n == 0: its reply is the result) or a batch of n commands (a list of replies)."""

    __slots__ = ("deadline", "fut", "n", "replies")

    def __init__(self, fut: asyncio.Future[Any], n: int, deadline: float) -> None:
        self.fut = fut
        self.n = n
        self.replies: list[Any] | None = [] if n else None
        self.deadline = deadline


class _Connection(asyncio.Protocol):
    """One connection: writes commands as they come, hands replies to the calls in order.

    Write backpressure (pause_writing) is deliberately ignored: commands are small, every one has
    a deadline, and a server that stops reading makes the oldest one time out, which closes the
    connection and frees its buffer. So the buffer is bounded by what callers send in `timeout_s`
    (each request awaits its own reply; ledger batches are bounded by the writer's batch size).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, addr: str) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        # Error replies become redis-py exception objects (NoScriptError, ResponseError, ...),
        # returned as values, so a batch can carry them in place and nothing is raised mid-parse.
        self.reader = hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)
        self.pending: deque[_Call] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.overdue: _Call | None = None   # found past its deadline once; fails if still pending
        self.closed = False                 # set once: no command may be sent any more
        self.lost: asyncio.Future[None] = loop.create_future()   # done when the transport is gone
        self.wbuf: list[bytes] = []         # commands sent in this loop pass, written by _flush

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, n: int) -> asyncio.Future[Any]:
        """Queue packed command(s) for this loop pass's write; the future gets the reply (n == 0)
        or n replies."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        if self.closed or self.transport is None:
            fut.set_exception(RedisConnectionError(f"Connection to {self.addr} closed"))
            return fut
        call = _Call(fut, n, self.loop.time() + self.timeout_s)
        self.pending.append(call)
        # Commands queued in one pass of the event loop go out in one write (one syscall instead
        # of one per command: under load, a dozen admissions and settlements share it). Order is
        # kept: the buffer is appended in the same order as `pending`.
        self.wbuf.append(data)
        if len(self.wbuf) == 1:
            self.loop.call_soon(self._flush)
        if self.timer is None:
            self.timer = self.loop.call_at(call.deadline, self._check_deadline)
        return fut

    def _flush(self) -> None:
        data, self.wbuf = self.wbuf, []
        if self.closed or self.transport is None or not data:
            return   # fail() already failed every pending call
        try:
            self.transport.write(data[0] if len(data) == 1 else b"".join(data))
        except (RuntimeError, OSError) as exc:  # uvloop raises on a transport closed under us
            self.fail(RedisConnectionError(f"Error writing to {self.addr}: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Protocol error from {self.addr}: {exc}"))
                return
            if reply is _MORE:
                return
            if not pending:   # a reply nobody asked for: the stream can't be trusted
                self.fail(RedisConnectionError(f"Unexpected reply from {self.addr}"))
                return
            call = pending[0]
            if call.n:
                replies = call.replies
                assert replies is not None
                replies.append(reply)
                if len(replies) < call.n:
                    continue
                reply = replies
            pending.popleft()
            fut = call.fut
            if fut.done():          # the caller was cancelled: its reply is read and dropped
                continue
            if not call.n and isinstance(reply, RedisError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(
            f"Error reading from {self.addr}: {exc}" if exc else
            f"Connection closed by server ({self.addr})."))
        if not self.lost.done():
            self.lost.set_result(None)

    def _check_deadline(self) -> None:
        # The oldest pending call has the earliest deadline (all share timeout_s), so one timer
        # per connection, re-armed for the next oldest, watches them all.
        self.timer = None
        if self.closed or not self.pending:
            return
        oldest = self.pending[0]
        if self.loop.time() + _SLACK_S < oldest.deadline:
            self.timer = self.loop.call_at(oldest.deadline, self._check_deadline)
        elif self.overdue is not oldest:
            # Overdue, but perhaps only because this process was busy or descheduled: uvloop runs
            # due timers before polling sockets, so after a stall the reply may be waiting unread.
            # Look again after one poll (a timer 1 ms ahead is not run in this same pass).
            self.overdue = oldest
            self.timer = self.loop.call_later(_SLACK_S, self._check_deadline)
        else:
            self.fail(RedisTimeoutError(f"Timeout reading from {self.addr}"))

    def fail(self, exc: RedisError) -> None:
        """Close for good and fail every pending call with (a copy of) `exc`."""
        was_closed, self.closed = self.closed, True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not was_closed and self.transport is not None:
            self.transport.abort()   # drop unsent data: nothing more will be read from it
        pending, self.pending = self.pending, deque()
        for call in pending:
            if not call.fut.done():
                call.fut.set_exception(type(exc)(*exc.args))


class WireRedis:
    """A pipelined client for one Redis node: `redis://`, `rediss://` (TLS) or `unix://` URLs.

    `timeout_s` bounds connecting (with AUTH and SELECT) and every command, from send to reply.
    """

    def __init__(self, url: str, timeout_s: float = 0.25, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        u = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(query) - _URL_OPTIONS
        if unknown:
            raise ValueError(f"unsupported Redis URL option(s) {sorted(unknown)}: supported are "
                             f"{sorted(_URL_OPTIONS)} (timeouts come from the store config)")
        self._username = query.get("username") or (unquote(u.username) if u.username else None)
        self._password = query.get("password") or (unquote(u.password) if u.password else None)
        self._path: str | None = None
        self._host, self._port = "", 6379
        self._ssl: ssl.SSLContext | None = None
        if u.scheme == "unix":
            self._path = unquote(u.path)
            db = query.get("db", "0")
            self._addr = self._path
        elif u.scheme in ("redis", "rediss"):
            self._host, self._port = unquote(u.hostname or "localhost"), u.port or 6379
            db = query.get("db") or u.path.strip("/") or "0"
            self._addr = f"{self._host}:{self._port}"
            if u.scheme == "rediss":
                self._ssl = ssl_context or _ssl_context(query)
        else:
            raise ValueError(f"not a redis://, rediss:// or unix:// URL: {u.scheme}://")
        self._db = int(db)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    def __repr__(self) -> str:
        return f"WireRedis<{self._addr}/{self._db}>"

    async def execute_command(self, *args: Arg) -> Any:
        """Send one command; its reply, or the redis-py exception of an error reply."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connected()
        return await conn.send(_pack(args), 0)

    async def execute_many(self, commands: Sequence[Sequence[Arg]],
                           raise_on_error: bool = False) -> list[Any]:
        """Send commands in one write; their replies in order, error replies as exception values
        (or the first one raised, with `raise_on_error`). Not a transaction: each runs alone."""
        if not commands:
            return []
        data = b"".join([_pack(tuple(c)) for c in commands])
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connected()
        replies: list[Any] = await conn.send(data, len(commands))
        if raise_on_error:
            for r in replies:
                if isinstance(r, RedisError):
                    raise r
        return replies

    async def ping(self) -> bool:
        """True, or raises when the store does not answer."""
        return bool(await self.execute_command("PING") == b"PONG")

    async def get(self, name: str | bytes) -> bytes | None:
        reply: bytes | None = await self.execute_command("GET", name)
        return reply

    async def set(self, name: str | bytes, value: Arg, px: int | None = None,
                  nx: bool = False) -> bool:
        """SET; False when `nx` found the key already there."""
        args: list[Arg] = ["SET", name, value]
        if px is not None:
            args += ["PX", px]
        if nx:
            args.append("NX")
        return await self.execute_command(*args) is not None

    async def aclose(self) -> None:
        """Close the connection (pending commands fail with ConnectionError). A later command
        would connect again."""
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(RedisConnectionError("client closed"))
            await asyncio.wait((conn.lost,), timeout=1.0)   # bounded: never hang a shutdown

    async def _connected(self) -> _Connection:
        # One connect attempt at a time, shared by every caller that needs it; shielded so a
        # cancelled caller does not cancel the others' connect.
        task = self._connecting
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open())
            self._connecting = task
            task.add_done_callback(self._connect_done)
        return await asyncio.shield(task)

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()   # retrieved here, so an attempt nobody awaits any more is quiet

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                def factory() -> _Connection:
                    return _Connection(loop, self.timeout_s, self._addr)
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(factory, self._path)
                else:
                    _, conn = await loop.create_connection(
                        factory, self._host, self._port, ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None)
                hello: list[tuple[Arg, ...]] = []
                if self._password is not None:
                    hello.append(("AUTH", self._username, self._password) if self._username
                                 else ("AUTH", self._password))
                if self._db:
                    hello.append(("SELECT", self._db))
                if hello:
                    for r in await conn.send(b"".join(map(_pack, hello)), len(hello)):
                        if isinstance(r, RedisError):
                            raise r
        except BaseException as exc:
            if conn is not None:
                conn.fail(RedisConnectionError("connect failed"))
            if isinstance(exc, TimeoutError):   # asyncio.timeout's; before OSError, its base
                raise RedisTimeoutError(f"Timeout connecting to {self._addr}") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Error connecting to {self._addr}: {exc}") from exc
            raise
        assert conn is not None
        self._conn = conn
        return conn


def _ssl_context(query: dict[str, str]) -> ssl.SSLContext:
    """The TLS context for `rediss://`: verify the server against the system CAs (or
    `ssl_ca_certs`) and its name, unless `ssl_cert_reqs=none|optional` says otherwise."""
    ctx = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("none", "optional", "required"):
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")
    check = query.get("ssl_check_hostname", "true" if reqs != "none" else "false").lower()
    ctx.check_hostname = check in ("1", "true", "yes", "y")
    ctx.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                       "required": ssl.CERT_REQUIRED}[reqs]
    if "ssl_certfile" in query:
        ctx.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    return ctx
