"""The upstream hop: one pooled aiohttp ClientSession per process, behind a small interface.

aiohttp rather than httpx: measured on one core, httpx's pool costs ~1 ms CPU per request at
concurrency 32 (issue #2), aiohttp's connector ~0.1 ms. The pool is unbounded (limit=0) because the
proxy's own concurrency limits bound it, and a fixed cap would queue thousands of open streams.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import aiohttp

from meterproxy.errors import UpstreamTimeout, UpstreamUnreachable


class Upstream:
    """Sends requests to providers; maps transport failures to 502/504 ProxyErrors."""

    def __init__(self, connect_timeout_s: float = 10.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30,
            family=socket.AF_UNSPEC,
        )
        # auto_decompress off: bodies pass through byte for byte, Content-Encoding intact.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                      body: bytes | None, timeout_s: float) -> aiohttp.ClientResponse:
        """Send and return once the response headers are in; the caller reads and releases it."""
        assert self._session is not None, "Upstream.start() not called"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
        try:
            return await self._session.request(
                method, url, headers=headers, data=body, timeout=timeout,
                allow_redirects=False, compress=None, auto_decompress=False,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("The provider did not answer in time.") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"The provider could not be reached ({type(exc).__name__}).") from exc


def error_kind(exc: BaseException) -> str:
    """Label value for meterproxy_upstream_errors_total{kind}."""
    if isinstance(exc, UpstreamTimeout | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(exc, aiohttp.ClientConnectorError | UpstreamUnreachable):
        return "connect"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return "broken_stream"
    return "other"
