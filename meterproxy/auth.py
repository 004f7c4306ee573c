"""Client authentication: the key from `Authorization: Bearer`, `x-api-key` or `x-goog-api-key`,
looked up by sha256.

Keys never exist in memory beyond this call: the config holds only their hashes, and the lookup is
one dict access on the hex digest (a timing side channel on a dict of hashes reveals nothing useful
about a key, because an attacker cannot choose digest prefixes).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from meterproxy.config import Config, Principal
from meterproxy.errors import AuthError, InvalidRequest


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The single key a request carries, or None. Two different keys (in one header twice, or in
    both headers) are rejected: a request must not be able to choose which one is checked."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                raise AuthError("Unsupported Authorization scheme; use 'Bearer <key>'.")
            candidate = token.strip()
        elif name in (b"x-api-key", b"x-goog-api-key"):   # Anthropic's and Gemini's SDKs
            candidate = value.strip()
        else:
            continue
        if found is not None and candidate != found:
            raise AuthError("The request carries two different API keys.")
        found = candidate
    if not found:
        return None
    try:
        return found.decode("ascii")
    except UnicodeDecodeError as exc:
        raise AuthError("Incorrect API key provided.") from exc


def key_hash(key: str) -> str:
    """Hex sha256 of a key, the only form in which keys are stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def authenticate(cfg: Config, headers: Iterable[tuple[bytes, bytes]]) -> Principal:
    """The principal of the request's key; AuthError (401) when missing or unknown."""
    key = presented_key(headers)
    if key is None:
        raise AuthError("You didn't provide an API key. Use 'Authorization: Bearer <key>' or 'x-api-key'.")
    principal = cfg.principals.get(key_hash(key))
    if principal is None:
        raise AuthError("Incorrect API key provided.")
    return principal


def is_admin(cfg: Config, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True only for the configured admin key (constant-time compare of the digests)."""
    want = cfg.raw.admin.key_sha256
    try:
        key = presented_key(headers)
    except (AuthError, InvalidRequest):
        return False
    if want is None or key is None:
        return False
    return hmac.compare_digest(key_hash(key), want)
