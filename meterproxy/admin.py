"""The small JSON endpoints: /usage for a client key, /admin/usage and /admin/usage/records."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meterproxy import errors
from meterproxy.auth import authenticate, is_admin
from meterproxy.errors import AdminOnly, InvalidRequest, ProxyError, StoreUnavailable
from meterproxy.ledger import GROUP_FIELDS
from meterproxy.state import AppState
from meterproxy.store import StoreError


def error_response(err: ProxyError) -> Response:
    """errors.error_response as a Starlette Response (its headers exactly, no others added)."""
    status, headers, body = errors.error_response(err)
    resp = Response(body, status_code=status)
    resp.raw_headers = headers
    return resp


def parse_when(value: str | None, name: str, end: bool = False) -> datetime | None:
    """ISO date or datetime, UTC. A bare `until` date includes that whole day."""
    if not value:
        return None
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            dt = datetime(d.year, d.month, d.day, tzinfo=UTC)
            return dt.replace(hour=23, minute=59, second=59, microsecond=999999) if end else dt
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (ValueError, OverflowError) as exc:   # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise InvalidRequest(f"{name}: not an ISO date or datetime in range", param=name) from exc


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
    group_by = [g for g in q.get("group_by", "").split(",") if g]
    bad = [g for g in group_by if g not in GROUP_FIELDS]
    if bad:
        raise InvalidRequest(f"group_by: unknown field {bad[0]!r}; use {','.join(GROUP_FIELDS)}",
                             param="group_by")
    since, until = parse_when(q.get("since"), "since"), parse_when(q.get("until"), "until", end=True)
    try:
        result: dict[str, Any] = await state.ledger.query(
            user=q.get("user") or None, key=q.get("key") or None, team=q.get("team") or None,
            model=q.get("model") or None, provider=q.get("provider") or None,
            since=since, until=until, group_by=group_by)
    except ValueError as exc:   # a date the ledger cannot represent: the client's error
        raise InvalidRequest(f"since/until: {exc}", param="since") from exc
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
