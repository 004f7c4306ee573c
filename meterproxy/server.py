"""The listening server: uvicorn with a client-hardened httptools protocol (issue #14).

uvicorn's httptools protocol puts no bound on what a client may send before the application sees a
request: the head has no size or field-count limit, only the idle keep-alive has a timeout (a client
trickling its head or body holds the connection forever), and chunked trailer fields are appended to
the request headers (a key in a trailer authenticated). `LimitedHttpToolsProtocol` keeps uvicorn's
fast path and adds, per connection:

- request line + header fields over `max_header_bytes`, or more than `max_headers` fields → 431, close;
- no complete head within `header_timeout_s` of the connection (or of the first byte of the next
  request on a kept-alive connection) → 408, close;
- a request body that stops arriving for `body_read_timeout_s` while the application waits for it
  → 408, close (time the application is not reading does not count);
- more than `max_connections` open connections → 503 `server_overloaded`, close;
- chunked trailer fields are dropped, and their size bounded like the head's.

None of these runs while a response is being sent, so a slow stream download is never cut by them.
Memory a client can make the parser hold is bounded by about `max_header_bytes` + two socket reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from meterproxy.config import Config
from meterproxy.errors import HeadersTooLarge, InvalidRequest, ProxyError, RequestTimeout, ServerOverloaded


@dataclass(frozen=True, slots=True)
class ClientLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_read_timeout_s: float
    max_connections: int


class ServerConfig(uvicorn.Config):
    """uvicorn's Config carrying the client limits to every protocol instance (picklable, so it
    reaches `--workers N` processes too)."""

    client_limits: ClientLimits


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing once the answer has been written."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: ServerConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.client_limits
        self._max_head = self.limits.max_header_bytes
        self._max_headers = self.limits.max_headers
        self._in_head = False        # a request has begun and its head is not complete
        self._head_bytes = 0         # request line + fields seen for the current request
        self._wire_bytes = 0         # bytes of reads wholly inside its head or trailer
        self._header_count = 0
        self._messages = 0           # requests begun on this connection
        self._in_body = False        # head complete, message not yet complete
        self._chunk_open = False     # a chunk header with no body after it (the last chunk: trailers)
        self._last_body = 0.0
        self._refused = False
        self._head_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None

    # --- connection -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # From the connection on: a client that connects and says nothing is cut like a slow one.
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        messages, in_head, chunk_open = self._messages, self._in_head, self._chunk_open
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()   # no WebSocket protocol is configured
            return
        except httptools.HttpParserError:
            if not self._refused:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        # Timers are armed only when a read leaves a head or body incomplete: a request that
        # arrives whole (most do) costs no timer at all.
        if self._in_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)
        elif self._in_body and self._body_timer is None:
            self._last_body = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_read_timeout_s, self._body_timeout)
        if messages != self._messages:
            return
        # A field still being received is accumulated inside the parser, where on_header cannot
        # see it: count the bytes of reads that fell wholly inside an incomplete head or trailer
        # (apart from on_header's count: the two overlap, each is at most the true size).
        if (in_head and self._in_head) or (chunk_open and self._chunk_open):
            self._wire_bytes += len(data)
            if self._wire_bytes > self._max_head:
                self._refuse(self._too_large())

    # --- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._messages += 1
        self._in_head = True
        self._head_bytes = 0
        self._wire_bytes = 0
        self._header_count = 0

    # on_url and on_header run per header field of every request: parent logic inlined, no super().
    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            self._refuse(self._too_large(), stop=True)
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            self._refuse(self._too_large(), stop=True)
        if not self._in_head:
            return  # a chunked trailer field: never a request header (it authenticated, issue #14)
        self._header_count += 1
        if self._header_count > self._max_headers:
            self._refuse(HeadersTooLarge(f"More than {self._max_headers} header fields."), stop=True)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if len(self.connections) > self.limits.max_connections or len(self.tasks) >= self.limits.max_connections:
            self.logger.warning("refused a request: %d connections open (server.max_connections)",
                                len(self.connections))
            self._refuse(ServerOverloaded("The proxy has too many open connections; retry shortly."),
                         stop=True)
        self._in_head = False
        self._in_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._chunk_open = False
        if self._body_timer is not None:   # armed only while a body is incomplete after a read
            self._last_body = self.loop.time()
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._chunk_open = True

    def on_chunk_complete(self) -> None:
        self._chunk_open = False

    def on_message_complete(self) -> None:
        self._in_body = False
        self._chunk_open = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # --- timers -----------------------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _responding(self) -> bool:
        return self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self._messages and not self._in_head):
            return
        if self._responding():
            # A pipelined request waits behind a response still being sent (a slow stream): its
            # clock restarts, never cutting the stream.
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)
            return
        self._refuse(RequestTimeout(
            f"The request head was not received within {self.limits.header_timeout_s:g} s."))

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._in_body:
            return
        idle = self.loop.time() - self._last_body
        waiting = self.cycle is not None and self.cycle.waiting_for_100_continue
        if idle < self.limits.body_read_timeout_s or self.flow.read_paused or waiting:
            # Bytes arrived meanwhile, or the application is not reading (flow control or an
            # unanswered Expect: 100-continue): not the client's delay, check again later.
            if self.flow.read_paused or waiting:
                self._last_body = self.loop.time()
            delay = self.limits.body_read_timeout_s - (self.loop.time() - self._last_body)
            self._body_timer = self.loop.call_later(max(delay, 0.01), self._body_timeout)
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()   # answered already (e.g. 401 before the body): just hang up
            return
        self._refuse(RequestTimeout(
            f"The request body stalled for {self.limits.body_read_timeout_s:g} s."))

    # --- refusing ---------------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser rejects, in the proxy's JSON error shape."""
        self._refuse(InvalidRequest(msg))

    def _too_large(self) -> ProxyError:
        return HeadersTooLarge(f"Request line and headers exceed {self.limits.max_header_bytes} bytes.")

    def _refuse(self, err: ProxyError, stop: bool = False) -> None:
        """Answer `err` (unless a response is under way on this connection) and close. An
        application task waiting for this request's body sees a disconnect."""
        if not self._refused and not self.transport.is_closing():
            self._refused = True
            self._cancel_timers()
            # Never write into a response under way; after a complete one only for a new request.
            mid_response = (self._responding() if self._in_head or self.cycle is None
                            else self.cycle.response_started)
            if not mid_response:
                body = err.body()
                head = [b"HTTP/1.1 %d %s\r\n" % (err.status, _REASONS.get(err.status, b"")),
                        b"content-type: application/json\r\n",
                        b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
                head += [name + b": " + value + b"\r\n" for name, value in err.headers()]
                self.transport.write(b"".join(head) + b"\r\n" + body)
            if self.cycle is not None and not self.cycle.response_complete and not self._in_head:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()
        if stop:
            raise _Refused()


STARTUP_FAILURE = 3  # uvicorn.main.STARTUP_FAILURE: what `uvicorn.run` exits with

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def _raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-files limit towards `wanted` (each client connection may hold an
    upstream connection too): accepting fails with EMFILE long before max_connections otherwise."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def client_limits(cfg: Config) -> ClientLimits:
    s = cfg.server
    return ClientLimits(max_header_bytes=s.max_header_bytes, max_headers=s.max_headers,
                        header_timeout_s=s.header_timeout_s, body_read_timeout_s=s.body_read_timeout_s,
                        max_connections=s.max_connections)


def server_config(app: Any, cfg: Config, **kwargs: Any) -> ServerConfig:
    """The uvicorn Config of `serve`: our protocol and the config file's client limits. `kwargs`
    are uvicorn's own options (host, port, workers, ...)."""
    config = ServerConfig(
        app, http=LimitedHttpToolsProtocol, ws="none",
        timeout_keep_alive=cfg.server.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        limit_concurrency=None,   # enforced by the protocol, with a JSON 503 (uvicorn's is plain text)
        **kwargs)
    config.client_limits = client_limits(cfg)
    _raise_fd_limit(2 * cfg.server.max_connections + 256)
    return config


def run(app: Any, cfg: Config, **kwargs: Any) -> None:
    """`uvicorn.run` for one process, with `server_config`; exits 3 when startup failed, as it does."""
    server = uvicorn.Server(server_config(app, cfg, **kwargs))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
