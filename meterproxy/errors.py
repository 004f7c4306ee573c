"""Errors the proxy itself answers, in the OpenAI error shape (docs/api.md "Errors").

    ProxyError                      status, type, code; body() -> OpenAI error JSON
    ├── AuthError                   401 invalid_request_error / invalid_api_key
    ├── ModelNotAllowed             403 permission_error / model_not_allowed
    ├── AdminOnly                   403 permission_error / admin_required
    ├── RateLimited                 429 requests|tokens|concurrency / rate_limit_exceeded (+ Retry-After)
    │   └── RequestTooLarge         429 tokens / rate_limit_exceeded, x-should-retry: false
    ├── QuotaExceeded               429 insufficient_quota / insufficient_quota, x-should-retry: false
    ├── InvalidJSON                 400 invalid_request_error / invalid_json
    ├── InvalidRequest              400 invalid_request_error / invalid_request
    ├── BodyTooLarge                413 invalid_request_error / request_too_large
    ├── UnknownRoute                404 invalid_request_error / unknown_route
    ├── NotFound                    404 invalid_request_error / not_found (async run of another key)
    ├── UpstreamUnreachable         502 upstream_error / upstream_unreachable
    ├── UpstreamTimeout             504 upstream_error / upstream_timeout
    └── StoreUnavailable            503 server_error / store_unavailable

Foreign exceptions are mapped where they occur (`raise X(...) from exc`); the ASGI layer turns any
ProxyError into a response with `to_response_parts()`.
"""

from __future__ import annotations

import math

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
        self.type = limit  # SPEC: type is the limit that bit (requests / tokens / concurrency)
        self.limit = limit
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after_s is None:
            return []
        secs = max(self.retry_after_s, 0.0)
        return [(b"retry-after", str(max(math.ceil(secs), 1)).encode()),
                (b"retry-after-ms", str(max(math.ceil(secs * 1000), 1)).encode())]


class RequestTooLarge(RateLimited):
    def __init__(self, message: str) -> None:
        super().__init__(message, limit="tokens", retry_after_s=None)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-should-retry", b"false")]


class QuotaExceeded(ProxyError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-should-retry", b"false")]


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
