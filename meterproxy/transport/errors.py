"""The transport's errors, and the one table that maps foreign exceptions to them.

Each class is at once the proxy's answer (a ProxyError: 502 upstream_unreachable or 504
upstream_timeout, with a message that names no host) and its metric label (`kind`, for
meterproxy_upstream_errors_total), so callers need no isinstance ladder: `err.kind`, `err.status`.
`str(err)` is the detail for logs and tests; the client only sees `err.message`.

    TransportError                  kind
    ├── ConnectError                connect        (refused, unreachable, TLS handshake, proxy refused)
    │   └── DNSError                dns
    ├── BrokenStream                broken_stream  (the connection ended mid-answer, or not HTTP/1.1)
    │   └── ClosedBeforeAnswer      broken_stream  (ended before any byte: a kept-alive race)
    └── Timeout                     timeout        (the whole-response deadline, or connecting)
        └── IdleTimeout             idle_timeout   (no byte for server.stream_idle_timeout_s)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from meterproxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable


class TransportError(ProxyError):
    kind = "other"
    public = "The provider could not be reached."

    def __init__(self, detail: str) -> None:
        super().__init__(self.public)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class ConnectError(TransportError, UpstreamUnreachable):
    kind = "connect"


class DNSError(ConnectError):
    kind = "dns"


class BrokenStream(TransportError, UpstreamUnreachable):
    kind = "broken_stream"
    public = "The provider closed the connection."


class ClosedBeforeAnswer(BrokenStream):
    """On a kept-alive connection, most likely the provider closing it as idle just as the request
    went out (the client retries an idempotent request once)."""


class Timeout(TransportError, UpstreamTimeout):
    kind = "timeout"
    public = "The provider did not answer in time."


class IdleTimeout(Timeout):
    kind = "idle_timeout"


# Foreign exception → ours, first match wins (httpx's HTTPCORE_EXC_MAP). Ours pass through.
EXC_MAP: tuple[tuple[type[BaseException], type[TransportError]], ...] = (
    (TimeoutError, Timeout),            # before OSError: TimeoutError is one
    (socket.gaierror, DNSError),
    (OSError, ConnectError),            # refused, unreachable, ssl.SSLError (an OSError)
)


def map_exception(exc: BaseException) -> TransportError | None:
    if isinstance(exc, TransportError):
        return exc
    for foreign, ours in EXC_MAP:
        if isinstance(exc, foreign):
            return ours(f"{type(exc).__name__}: {exc}")
    return None


@contextmanager
def map_exceptions(context: str) -> Iterator[None]:
    """Around foreign I/O (resolving, connecting, the TLS handshake, the proxy's CONNECT):
    anything it raises leaves as one of the classes above, `context` prefixed to its detail."""
    try:
        yield
    except TransportError:
        raise
    except Exception as exc:
        mapped = map_exception(exc)
        if mapped is None:
            raise
        mapped.detail = f"{context}: {mapped.detail}"
        raise mapped from exc
