"""Errors the proxy itself answers, in the OpenAI error shape (docs/api.md "Errors").

    ProxyError                      status, type, code; body() -> OpenAI error JSON
    ├── AuthError                   401 invalid_request_error / invalid_api_key
    ├── ModelNotAllowed             403 permission_error / model_not_allowed
    ├── AdminOnly                   403 permission_error / admin_required
    ├── ModelNotPriced              403 permission_error / model_not_priced (server.unpriced: refuse)
    ├── RateLimited                 429 requests|tokens|concurrency / rate_limit_exceeded (+ Retry-After)
    │   └── RequestTooLarge         429 tokens / rate_limit_exceeded, x-should-retry: false
    ├── QuotaExceeded               429 insufficient_quota / insufficient_quota, x-should-retry: false
    │                                   (+ Retry-After: until the budget's day or month ends, UTC)
    ├── InvalidJSON                 400 invalid_request_error / invalid_json
    ├── InvalidRequest              400 invalid_request_error / invalid_request
    ├── BodyTooLarge                413 invalid_request_error / request_too_large
    ├── UnknownRoute                404 invalid_request_error / unknown_route
    ├── NotFound                    404 invalid_request_error / not_found (async run of another key)
    ├── UpstreamUnreachable         502 upstream_error / upstream_unreachable
    ├── UpstreamTimeout             504 upstream_error / upstream_timeout
    │   (transport/errors.py subclasses both, one class per metric kind)
    └── StoreUnavailable            503 server_error / store_unavailable

Foreign exceptions are mapped where they occur (`raise X(...) from exc`; the transport's in one
table, transport/errors.py). `error_response` is the one place a ProxyError becomes an HTTP answer:
the proxy route sends it with `send_error`, the small endpoints wrap it in a Starlette Response.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from typing import Any

import orjson


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type,
                                       "code": self.code, "param": self.param}})


class AuthError(ProxyError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class ModelNotAllowed(ProxyError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class AdminOnly(ProxyError):
    status, type, code = 403, "permission_error", "admin_required"


class RateLimited(ProxyError):
    status, code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.type = limit  # docs/api.md "Errors": type is the limit that bit (requests / tokens / concurrency)
        self.limit = limit
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.retry_after_s is None else _retry_after(self.retry_after_s)


class RequestTooLarge(RateLimited):
    def __init__(self, message: str) -> None:
        super().__init__(message, limit="tokens", retry_after_s=None)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-should-retry", b"false")]


class QuotaExceeded(ProxyError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"

    def __init__(self, message: str, *, limit: str, now: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.now = now  # unix time of the refusal: Retry-After counts from it

    def headers(self) -> list[tuple[bytes, bytes]]:
        # docs/api.md "Errors": Retry-After = seconds until the window resets: the next UTC midnight for a
        # daily budget, the first of the next month for a monthly one.
        d = datetime.fromtimestamp(self.now, UTC).date()
        if self.limit.startswith("monthly"):
            end = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
        else:
            end = date.fromordinal(d.toordinal() + 1)
        secs = datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp() - self.now
        return [(b"x-should-retry", b"false"), *_retry_after(secs)]


class InvalidJSON(ProxyError):
    status, type, code = 400, "invalid_request_error", "invalid_json"


class InvalidRequest(ProxyError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class BodyTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UnknownRoute(ProxyError):
    status, type, code = 404, "invalid_request_error", "unknown_route"


class NotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "not_found"


class UpstreamUnreachable(ProxyError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


class StoreUnavailable(ProxyError):
    status, type, code = 503, "server_error", "store_unavailable"


# Client-connection refusals written by meterproxy/server.py before any application code runs
# (issue #14); each closes the connection.
#   RequestTimeout      408 invalid_request_error / request_timeout
#   HeadersTooLarge     431 invalid_request_error / request_header_fields_too_large
#   ServerOverloaded    503 server_error / server_overloaded (+ Retry-After: 1)

class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class HeadersTooLarge(ProxyError):
    status, type, code = 431, "invalid_request_error", "request_header_fields_too_large"


class ServerOverloaded(ProxyError):
    status, type, code = 503, "server_error", "server_overloaded"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"1")]


class ModelNotPriced(ProxyError):
    status, type, code = 403, "permission_error", "model_not_priced"


def _retry_after(secs: float) -> list[tuple[bytes, bytes]]:
    """Whole seconds rounded up, and milliseconds; never 0 (a client would retry at once)."""
    secs = max(secs, 0.0)
    return [(b"retry-after", str(max(math.ceil(secs), 1)).encode()),
            (b"retry-after-ms", str(max(math.ceil(secs * 1000), 1)).encode())]


def error_response(err: ProxyError, request_id: str | None = None
                   ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the answer to a ProxyError."""
    body = err.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *err.headers()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    return err.status, headers, body


async def send_error(send: Any, err: ProxyError, request_id: str | None = None) -> None:
    """Answer with `err` on a raw ASGI `send`."""
    status, headers, body = error_response(err, request_id)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
