"""Where a provider lives, resolved once when the config is loaded (not per request)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """A provider's extra trust and client certificate (providers.*.ca_file / client_cert, docs/configuration.md)."""

    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    # The files' modification times when the config was loaded: a certificate rotated in place
    # and then reloaded (SIGHUP) compares unequal, so the client builds a new context and pool.
    stamp: tuple[int, ...] = ()

    def stamped(self) -> TLSFiles:
        """This, with the files' current modification times (OSError if one is missing)."""
        paths = [p for p in (self.ca_file, self.cert, self.key) if p]
        return TLSFiles(self.ca_file, self.cert, self.key, tuple(os.stat(p).st_mtime_ns for p in paths))

    def context(self) -> ssl.SSLContext:
        """System CAs plus `ca_file`, hostname checking, and the client certificate if any.
        Raises OSError / ssl.SSLError for unreadable or mismatched files."""
        ctx = ssl.create_default_context()
        if self.ca_file:
            ctx.load_verify_locations(cafile=self.ca_file)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True, slots=True)
class Origin:
    """scheme://host:port of a provider, with what every request to it needs precomputed."""

    scheme: str
    host: str
    port: int
    host_header: bytes      # "host", "host:port" or "[v6]:port", as the Host header wants it
    base_path: bytes        # the base URL's own path ("" or "/openai"), prefixed to every target
    tls: TLSFiles | None    # None for http

    @classmethod
    def parse(cls, url: str, tls: TLSFiles | None = None) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"a base URL has no query or fragment: {url!r}")
        default = 443 if scheme == "https" else 80
        host, port = parts.hostname, parts.port or default
        host_header = f"[{host}]" if ":" in host else host
        if port != default:
            host_header += f":{port}"
        return cls(scheme, host, port, host_header.encode("ascii"),
                   parts.path.rstrip("/").encode("latin-1"),
                   (tls or TLSFiles()) if scheme == "https" else None)

    @property
    def authority(self) -> str:
        """host:port for CONNECT (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
