"""The small JSON endpoints: /usage for a client key, /admin/usage and /admin/usage/records."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meterproxy import errors
from meterproxy.auth import authenticate, is_admin
from meterproxy.errors import AdminOnly, InvalidRequest, ProxyError, StoreUnavailable
from meterproxy.ledger.query import QueryError, parse_bound
from meterproxy.state import AppState
from meterproxy.store import StoreError


def error_response(err: ProxyError) -> Response:
    """errors.error_response as a Starlette Response (its headers exactly, no others added)."""
    status, headers, body = errors.error_response(err)
    resp = Response(body, status_code=status)
    resp.raw_headers = headers
    return resp


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.mp
    return state


Handler = Callable[[Request, AppState], Awaitable[dict[str, Any]]]


def json_endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """One place that turns a handler's ProxyError into its OpenAI-shaped answer and a store
    outage into 503 (counted), so every small endpoint fails the same way."""

    async def endpoint(request: Request) -> Response:
        state = _state(request)
        try:
            return JSONResponse(await handler(request, state))
        except ProxyError as err:
            return error_response(err)
        except StoreError as exc:
            state.health.failed(exc.operation, exc)
            return error_response(StoreUnavailable("The usage store is unavailable."))

    return endpoint


@json_endpoint
async def usage(request: Request, state: AppState) -> dict[str, Any]:
    cfg = state.config
    p = authenticate(cfg, request.headers.raw)
    summary = await state.ledger.summary(p.key_id, p.user, time.time())
    limits = await state.limiter.status(p.key_id, p.user, p.limits, p.user_limits)
    return {"key": p.key_id, "user": p.user, **summary, "limits": limits}


def _require_admin(request: Request) -> None:
    state = _state(request)
    if not is_admin(state.config, request.headers.raw):
        if state.config.raw.admin.key_sha256 is None:
            raise AdminOnly("The admin API is disabled: set admin.key_sha256 in the config.")
        # Client keys are valid keys but not admin keys: 403; anything else 401.
        authenticate(state.config, request.headers.raw)
        raise AdminOnly("This endpoint requires the admin key.")


@json_endpoint
async def admin_usage(request: Request, state: AppState) -> dict[str, Any]:
    q = request.query_params
    _require_admin(request)
    try:
        result: dict[str, Any] = await state.ledger.query(
            user=q.get("user") or None, key=q.get("key") or None, team=q.get("team") or None,
            model=q.get("model") or None, provider=q.get("provider") or None,
            since=parse_bound(q.get("since"), "since"), until=parse_bound(q.get("until"), "until"),
            group_by=[g for g in q.get("group_by", "").split(",") if g])
    except QueryError as exc:   # a field or date the ledger cannot answer: the client's error
        raise InvalidRequest(str(exc), param=exc.param) from exc
    return result


@json_endpoint
async def admin_records(request: Request, state: AppState) -> dict[str, Any]:
    q = request.query_params
    _require_admin(request)
    try:
        limit = int(q.get("limit", "100"))
    except ValueError as exc:
        raise InvalidRequest("limit: must be an integer", param="limit") from exc
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("limit: must be between 1 and 10000", param="limit")
    try:
        result: dict[str, Any] = await state.ledger.records(q.get("since_id") or None, limit)
    except ValueError as exc:  # the ledger refuses a malformed since_id: the client's error, not a 500
        raise InvalidRequest("since_id: not a record id", param="since_id") from exc
    return result
