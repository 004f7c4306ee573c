"""The upstream hop: one pooled HTTP/1.1 client per process (meterproxy/transport/pool.py), behind a
small interface that maps transport failures to the proxy's 502/504 errors.

Not httpx (issue #2: ~1 ms CPU per request at concurrency 32) and no longer aiohttp (its client was
the largest single cost in the proxy's profile): a lean client built for this hop. The pool is
unbounded because the proxy's own concurrency limits bound it, and a fixed cap would queue
thousands of open streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from meterproxy.errors import UpstreamTimeout, UpstreamUnreachable
from meterproxy.transport.pool import BrokenStream, Client, ConnectError, DNSError, Response


class Upstream:
    """Sends requests to providers; maps transport failures to 502/504 ProxyErrors."""

    def __init__(self, connect_timeout_s: float = 10.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._client: Client | None = None

    async def start(self) -> None:
        self._client = Client(connect_timeout_s=self._connect_timeout_s, keepalive_s=30.0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def request(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                      body: bytes | None, timeout_s: float) -> Response:
        """Send and return once the response headers are in; the caller reads and releases it."""
        assert self._client is not None, "Upstream.start() not called"
        try:
            return await self._client.request(method, url, headers, body, timeout_s)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise UpstreamTimeout("The provider did not answer in time.") from exc
        except OSError as exc:  # ConnectError, DNSError, BrokenStream
            raise UpstreamUnreachable(f"The provider could not be reached ({type(exc).__name__}).") from exc


def error_kind(exc: BaseException) -> str:
    """Label value for meterproxy_upstream_errors_total{kind}."""
    if isinstance(exc, UpstreamTimeout | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, DNSError):
        return "dns"
    if isinstance(exc, ConnectError | UpstreamUnreachable):
        return "connect"
    if isinstance(exc, BrokenStream):
        return "broken_stream"
    return "other"
