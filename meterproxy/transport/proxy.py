"""Egress proxies from the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), read once at startup,
and the HTTP CONNECT handshake that opens a tunnel through one (docs/configuration.md "Environment variables").

https providers go through a CONNECT tunnel (TLS end to end with the provider: the proxy sees
only the host name); http providers through HTTP_PROXY get absolute-form request targets, as
curl and httpx send them. Only http:// proxy URLs are supported (TLS to the proxy itself is not).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from meterproxy.transport.errors import ConnectError
from meterproxy.transport.origin import Origin

_MAX_REPLY = 16 * 1024  # a CONNECT reply larger than this is not one


@dataclass(frozen=True, slots=True)
class ProxyURL:
    host: str
    port: int
    auth: bytes | None      # the Proxy-Authorization value, from user:password in the URL

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        if "://" not in url:
            url = "http://" + url   # curl's reading of HTTPS_PROXY=host:port
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError(f"only http:// egress proxies are supported, not {url!r}")
        auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = b"Basic " + base64.b64encode(pair.encode())
        return cls(parts.hostname, parts.port or 80, auth)


@dataclass(frozen=True, slots=True)
class Proxies:
    """Which proxy, if any, each origin goes through."""

    https: ProxyURL | None = None
    http: ProxyURL | None = None
    no_proxy: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Proxies:
        """Lower case wins over upper case, as in curl and urllib."""
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name.lower()) or env.get(name.upper()) or ""

        https, http = get("https_proxy"), get("http_proxy")
        return cls(ProxyURL.parse(https) if https else None, ProxyURL.parse(http) if http else None,
                   get("no_proxy"))

    def for_origin(self, origin: Origin) -> ProxyURL | None:
        proxy = self.https if origin.scheme == "https" else self.http
        if proxy is None:
            return None
        if self.no_proxy and _bypass(origin, self.no_proxy):
            return None
        return proxy


def _bypass(origin: Origin, no_proxy: str) -> bool:
    """curl's NO_PROXY: "*", or comma-separated host names, each matching itself and its
    subdomains (a leading dot is optional), IP addresses as written, an optional :port."""
    host = origin.host.lower()
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        if not entry:
            continue
        name, sep, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if sep and port != str(origin.port):
            continue
        name = name.strip("[]").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


class _Handshake(asyncio.Protocol):
    """Reads the proxy's reply to CONNECT, up to the blank line."""

    def __init__(self) -> None:
        self.reply = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.reply += data
        end = self.reply.find(b"\r\n\r\n")
        if end >= 0 and not self.done.done():
            self.done.set_result(bytes(self.reply[:end]))
        elif len(self.reply) > _MAX_REPLY and not self.done.done():
            self.done.set_exception(ConnectError("the egress proxy's CONNECT reply is too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectError("the egress proxy closed the connection during CONNECT"))


async def open_tunnel(loop: asyncio.AbstractEventLoop, proxy: ProxyURL, ip: str, port: int,
                      family: int, origin: Origin) -> asyncio.Transport:
    """A TCP connection to the proxy at ip:port on which CONNECT origin succeeded (a 2xx)."""
    transport, hs = await loop.create_connection(_Handshake, ip, port, family=family)
    try:
        head = f"CONNECT {origin.authority} HTTP/1.1\r\nHost: {origin.authority}\r\n".encode()
        if proxy.auth is not None:
            head += b"Proxy-Authorization: " + proxy.auth + b"\r\n"
        transport.write(head + b"\r\n")
        reply = await hs.done
        status_line = reply.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].startswith(b"2"):
            raise ConnectError(f"the egress proxy refused CONNECT {origin.authority}: "
                               f"{status_line[:200].decode('latin-1')}")
    except BaseException:
        transport.abort()
        raise
    return transport
