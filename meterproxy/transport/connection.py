"""One upstream HTTP/1.1 connection (an asyncio.Protocol parsing with httptools) and the response
it is reading. The pool, connecting and request writing are in meterproxy/transport/pool.py.

Everything here runs inside the event loop's read callback: `data_received` feeds the parser, the
parser's callbacks put body bytes on the response and wake whoever awaits it. No Task and no
stream object per request: one future per wait, one timer per request (deadline and idle timeout).

State of a response, from the connection's side:
    headers pending  status == 0
    body pending     status != 0, not done, no error
    done             the body is complete; the connection went back to the pool (or was closed)
    failed           _exc set (timeout, broken connection, malformed response, closed by the caller)
`done` and `failed` are final and exclusive. A connection carries at most one response at a time
(no pipelining) and is detached from it (conn.resp = None, resp._conn = None) the moment either
final state is reached, so a closed-early response can never touch a connection that is already
serving the next request.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

from meterproxy.transport.errors import BrokenStream, ClosedBeforeAnswer, IdleTimeout, Timeout, TransportError

# Unread body bytes beyond which the socket stops being read (TCP then pushes back on the
# provider): a slow client must not make the proxy buffer a whole stream.
READ_HIGH_WATER = 64 * 1024
# Response headers beyond this many bytes are refused (aiohttp refused lines over 8 KB): a broken
# or hostile provider cannot grow the proxy's memory through endless headers.
MAX_HEADER_BYTES = 256 * 1024


class Owner(Protocol):
    """What a connection needs from its pool (meterproxy/transport/pool.py)."""

    def put(self, conn: Connection) -> None: ...
    def forget(self, conn: Connection) -> None: ...


def _wake(resp: Response) -> None:
    waiter = resp._waiter
    if waiter is not None:
        resp._waiter = None
        if not waiter.done():  # a cancelled wait leaves its future here until the task runs
            waiter.set_result(None)


class Response:
    """An upstream response: `status`, `raw_headers` (wire order and bytes; `header()` finds one),
    then the body through `read()` (whole) or `readany()` (as it arrives); end with `release()`
    (body read) or `close()` (abandon: the connection is dropped so the provider stops).

    One timer per response serves both timeouts: it fires at the earlier of the deadline (whole
    exchange) and `idle_s` after the last byte, and re-arms itself while bytes keep coming, so a
    steady stream costs one loop.time() per read, not a timer per chunk."""

    __slots__ = ("_body", "_chunks", "_conn", "_deadline", "_done", "_exc", "_idle", "_last", "_loop",
                 "_size", "_timer", "_waiter", "_whole", "raw_headers", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Connection, deadline: float,
                 idle_s: float) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._loop = loop
        self._deadline = deadline
        self._idle = idle_s
        self._last = loop.time()
        self._conn: Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._whole = False  # read() is collecting the whole body: no wake-up per piece, no pausing
        self._exc: TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = loop.call_at(min(deadline, self._last + idle_s),
                                                                self._on_timer)
        self._body: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (`name` in lower case). A linear scan: a response has a
        dozen headers, read once or twice."""
        for k, v in self.raw_headers:
            if k.lower() == name:
                return v
        return None

    @property
    def done(self) -> bool:
        """The whole body has arrived (what is left to read is buffered here)."""
        return self._done

    async def read(self) -> bytes:
        """The whole body."""
        if self._body is not None:
            return self._body
        self._whole = True
        self._resume()
        while not self._done:
            if self._exc is not None:
                raise self._exc
            waiter = self._waiter = self._loop.create_future()
            await waiter
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._body = body
        return body

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some if none); b"" at the end. Bytes that
        arrived before a broken connection are handed out before the error; a timeout is raised at
        once (the deadline is for the whole exchange)."""
        while True:
            exc = self._exc
            if self._chunks and not isinstance(exc, Timeout):
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                self._resume()
                return data
            if exc is not None:
                raise exc
            if self._done:
                return b""
            waiter = self._waiter = self._loop.create_future()
            await waiter

    def release(self) -> None:
        """The body was read: its connection is back in the pool already (see Connection._finish)."""
        if not self._done:
            self.close()

    def close(self) -> None:
        """Abandon the response: drop its connection unless it was already returned to the pool."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.resp = None
            conn.abort()
        self._cancel_timer()
        if not self._done and self._exc is None:
            self._exc = BrokenStream("the response was closed")

    def _resume(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused:
            conn.paused = False
            conn.transport.resume_reading()

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _fail(self, exc: TransportError) -> None:
        """Final error: any wait raises it. The caller has detached the connection."""
        if self._done or self._exc is not None:
            return
        self._exc = exc
        self._cancel_timer()
        _wake(self)

    def _on_timer(self) -> None:
        """The deadline passed, or no byte came for `idle_s`: the connection is closed mid-answer."""
        self._timer = None
        now = self._loop.time()
        err: Timeout
        if now >= self._deadline:
            err = Timeout("the provider did not finish answering in time")
        elif now - self._last >= self._idle:
            err = IdleTimeout(f"the provider sent nothing for {self._idle:g} s")
        else:  # bytes came since the timer was armed
            self._timer = self._loop.call_at(min(self._deadline, self._last + self._idle), self._on_timer)
            return
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.resp = None
            conn.abort()
        self._fail(err)


class Connection(asyncio.Protocol):
    """A keep-alive connection to one origin; `resp` is the response being read, None when idle."""

    __slots__ = ("head", "idle", "idle_since", "parser", "paused", "pool", "resp", "transport")

    transport: asyncio.Transport

    def __init__(self, pool: Owner) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.paused = False
        self.head = False  # the current request is a HEAD: no body follows, whatever the headers say
        self.idle = False  # in the pool's idle deque
        self.idle_since = 0.0

    def abort(self) -> None:
        self.transport.abort()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        resp = self.resp
        if resp is None:
            return
        if resp.status and exc is None and _until_close(resp.raw_headers):
            # A body framed by neither Content-Length nor chunked ends where the connection does.
            self._finish(reuse=False)
            return
        self.resp = None
        resp._conn = None
        err = (BrokenStream("the provider closed the connection") if resp.status or resp.raw_headers
               else ClosedBeforeAnswer("the provider closed the connection before answering"))
        err.__cause__ = exc
        resp._fail(err)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            # Bytes nobody asked for (a 408 on an idle connection, or junk after a response):
            # this connection's framing can no longer be trusted.
            self.transport.abort()
            return
        resp._last = resp._loop.time()  # the idle timer reads it when it fires
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(BrokenStream("the provider switched protocols"))
        except httptools.HttpParserError as exc:
            self._broken(BrokenStream(f"malformed response from the provider: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost ends a close-delimited body or fails an unfinished one

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self.resp is None:  # a second response in the bytes that completed the first
            self.transport.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp is not None and not resp.status:  # not the trailers of a chunked body
            resp.raw_headers.append((name, value))
            resp._size += len(name) + len(value)  # the body's buffer count is free until the body
            if resp._size > MAX_HEADER_BYTES:
                self._broken(BrokenStream("the provider's response headers are too large"))

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        status = self.parser.get_status_code()
        resp._size = 0
        if status < 200:
            # 1xx (100 Continue, 103 Early Hints): informational, the real answer follows. (101
            # raises HttpParserUpgrade from feed_data: we never ask to switch protocols.)
            resp.raw_headers.clear()
            return
        resp.status = status
        if self.head:
            # Simplest correct HEAD: the answer is complete with its headers, and as the parser
            # would wait for a Content-Length of body, the connection is not reused.
            self._finish(reuse=False)
            return
        _wake(resp)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is None:
            return
        resp._chunks.append(body)
        resp._size += len(body)
        if resp._whole:
            return  # read() is woken once, at the end
        if resp._size > READ_HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        _wake(resp)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or not resp.status:
            return  # after a 1xx: still waiting for the real answer
        self._finish(reuse=self.parser.should_keep_alive())  # False for Connection: close, HTTP/1.0

    # --- internals ---

    def _finish(self, reuse: bool) -> None:
        """The response is complete: detach it and give the connection back to the pool (the body
        already sits on the response, so this need not wait for the reader)."""
        resp = self.resp
        assert resp is not None
        self.resp = None
        resp._conn = None
        resp._done = True
        resp._cancel_timer()
        transport = self.transport
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if reuse and not transport.is_closing():
            self.pool.put(self)
        else:
            transport.close()
        _wake(resp)

    def _broken(self, exc: BrokenStream) -> None:
        self.transport.abort()
        resp = self.resp
        if resp is not None:
            self.resp = None
            resp._conn = None
            resp._fail(exc)


def _until_close(raw: list[tuple[bytes, bytes]]) -> bool:
    """True if a response body runs until the connection closes (no length, not chunked)."""
    for name, _ in raw:
        low = name.lower()
        if low in (b"content-length", b"transfer-encoding"):
            return False
    return True
