"""Header hygiene for both hops, and the x-ratelimit-* headers the proxy answers with."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from meterproxy.auth import KEY_HEADERS
from meterproxy.config import Provider
from meterproxy.limits import RateSnapshot

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the proxy itself owns on each hop.
_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
_CLIENT_OWNED = _HOP | KEY_HEADERS | {b"host", b"content-length", b"x-request-id"}
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers named in `Connection:` are hop-by-hop too."""
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def client_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's x-request-id if it is sane (short, no odd characters); else None."""
    for name, value in headers:
        if name == b"x-request-id" and _SANE_REQUEST_ID.match(value):
            return value.decode("ascii")
    return None


def upstream_headers(headers: list[tuple[bytes, bytes]], provider: Provider, client_ip: str | None,
                     request_id: str, body_replaced: bool) -> list[tuple[bytes, bytes]]:
    """End-to-end client headers minus credentials and hop-by-hop, plus the provider's credential,
    x-forwarded-for and x-request-id."""
    drop = _CLIENT_OWNED | _connection_tokens(headers)
    if provider.auth_header is not None:
        drop = drop | {provider.auth_header}
    out: list[tuple[bytes, bytes]] = []
    xff: bytes | None = None
    for name, value in headers:
        if name in drop or name.startswith(b"x-meterproxy-"):   # the proxy's own, never upstream
            continue
        if name == b"x-forwarded-for":
            xff = value
            continue
        if body_replaced and name == b"content-encoding":
            continue
        out.append((name, value))
    if client_ip:
        ip = client_ip.encode("latin-1")
        out.append((b"x-forwarded-for", xff + b", " + ip if xff else ip))
    out.append((b"x-request-id", request_id.encode("latin-1")))
    if provider.auth_header is not None and provider.auth_value is not None:
        out.append((provider.auth_header, provider.auth_value))
    return out


def response_headers(raw: Iterable[tuple[bytes, bytes]], drop_length: bool) -> list[tuple[bytes, bytes]]:
    """Provider response headers minus hop-by-hop and the provider's own x-ratelimit-* set."""
    raw = list(raw)
    drop = _HOP | _connection_tokens(raw) | {b"x-request-id"}
    if drop_length:
        drop = drop | {b"content-length"}
    out = []
    for name, value in raw:
        low = name.lower()
        if low in drop or low.startswith(b"x-ratelimit-"):
            continue
        out.append((low, value))
    return out


def fmt_reset(seconds: float) -> str:
    """Reset durations as OpenAI writes them: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 1)}ms"
    total = math.ceil(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def ratelimit_headers(snap: RateSnapshot | None) -> list[tuple[bytes, bytes]]:
    """The key's own x-ratelimit-{limit,remaining,reset}-{requests,tokens}."""
    if snap is None:
        return []
    out: list[tuple[bytes, bytes]] = []
    if snap.limit_requests is not None:
        out += [(b"x-ratelimit-limit-requests", str(snap.limit_requests).encode()),
                (b"x-ratelimit-remaining-requests", str(snap.remaining_requests or 0).encode()),
                (b"x-ratelimit-reset-requests", fmt_reset(snap.reset_requests_s).encode())]
    if snap.limit_tokens is not None:
        out += [(b"x-ratelimit-limit-tokens", str(snap.limit_tokens).encode()),
                (b"x-ratelimit-remaining-tokens", str(snap.remaining_tokens or 0).encode()),
                (b"x-ratelimit-reset-tokens", fmt_reset(snap.reset_tokens_s).encode())]
    return out
