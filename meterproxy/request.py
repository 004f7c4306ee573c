"""Before forwarding: route, authenticate, read and check the body, admit against the limits.

Produces a `Call` — everything the forwarder and the metering step need to know about one request.
"""

from __future__ import annotations

import os
import time
from time import perf_counter
from typing import Any

import orjson

from meterproxy.auth import authenticate
from meterproxy.config import Config
from meterproxy.endpoints import Endpoint, classify, normalise
from meterproxy.errors import (
    BodyTooLarge,
    InvalidJSON,
    InvalidRequest,
    ModelNotAllowed,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UnknownRoute,
)
from meterproxy.headers import client_request_id
from meterproxy.limits import Admission, StoreError
from meterproxy.metering.estimate import cheap_prompt_estimate
from meterproxy.metering.usage import Usage
from meterproxy.record import Call
from meterproxy.state import AppState

_BUDGETS = frozenset({"daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd"})
_MAX_N = 128  # reservation multiplier cap; a larger n is the provider's to refuse


# Where prepare leaves the authenticated principal in the ASGI scope (as Starlette's
# AuthenticationMiddleware does), so a rejection is attributed without authenticating again.
PRINCIPAL = "meterproxy.principal"


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _reject_traversal(path: str) -> None:
    # The upstream path is the client's own; dot segments could escape the provider's prefix
    # (/v1/../admin) on servers that normalise, so no such path is forwarded at all.
    if "/../" in path or "/./" in path or path.endswith(("/..", "/.")) or "\\" in path:
        raise InvalidRequest("Paths with dot segments are not allowed.")


async def read_body(receive: Any, limit: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The whole request body, refusing more than `limit` bytes (early, by Content-Length)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError as exc:
                raise InvalidRequest("Invalid Content-Length.") from exc
            if declared > limit:
                raise BodyTooLarge(f"Request body exceeds {limit} bytes.")
    msg = await receive()
    if msg["type"] == "http.disconnect":
        raise ClientGone()
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        if len(body) > limit:
            raise BodyTooLarge(f"Request body exceeds {limit} bytes.")
        return body
    parts = [body]
    size = len(body)
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body exceeds {limit} bytes.")
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def reservation(cfg: Config, body: dict[str, Any] | None, body_len: int) -> int:
    """Tokens to reserve: a cheap prompt estimate from the body size (tokenising on the hot path
    is CPU we need not spend: settlement corrects it) + the completion allowance times n."""
    if body is None:
        return 0
    prompt = cheap_prompt_estimate(body_len)
    completion = _positive_int(body.get("max_completion_tokens"))
    if completion is None:
        completion = _positive_int(body.get("max_output_tokens"))
    if completion is None:
        completion = _positive_int(body.get("max_tokens"))
    if completion is None:
        completion = cfg.server.default_max_tokens
    n = _positive_int(body.get("n")) or 1
    return prompt + completion * min(n, _MAX_N)


async def prepare(state: AppState, cfg: Config, scope: dict[str, Any], receive: Any) -> Call:
    """Everything up to (not including) the upstream request. Raises ProxyError or ClientGone."""
    t0 = perf_counter()
    path: str = scope["path"]
    _reject_traversal(path)
    provider = cfg.route(path)
    if provider is None:
        raise UnknownRoute(f"No provider is configured for {path}.")
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    principal = scope[PRINCIPAL] = authenticate(cfg, headers)  # a rejection below is counted under it
    method: str = scope["method"]
    body_bytes = await read_body(receive, cfg.server.max_body_bytes, headers)
    endpoint: Endpoint | None = classify(normalise(path)) if method == "POST" else None
    metered = endpoint is not None
    body: dict[str, Any] | None = None
    if metered:
        try:
            parsed = orjson.loads(body_bytes)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSON("We could not parse the JSON body of your request.") from exc
        if not isinstance(parsed, dict):
            raise InvalidJSON("The request body must be a JSON object.")
        body = parsed
    model = body.get("model") if body is not None else None
    model = model if isinstance(model, str) else ""
    if body is not None and not principal.allows_model(model):
        raise ModelNotAllowed(f"The model '{model[:200]}' is not allowed for this key.")

    stream_requested = False
    inject = False
    async_create = False
    if body is not None:
        stream_field = body.get("stream")
        stream_requested = (stream_field is True) if "stream" in body else provider.stream_by_default
        async_create = provider.poll_prefix is not None and body.get("async") is True
        if stream_requested and endpoint is not None and endpoint.stream_options:
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                # SPEC "Metering rules": ask for usage upstream, strip it from what the client sees.
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                body_bytes = orjson.dumps(body)
                inject = True

    poll_uid: str | None = None
    if provider.poll_prefix and path.startswith(provider.poll_prefix) and method == "GET":
        rest = path[len(provider.poll_prefix):]
        if provider.poll_suffix:
            rest = rest[: -len(provider.poll_suffix)] if rest.endswith(provider.poll_suffix) else ""
        if rest and "/" not in rest:
            poll_uid = rest
            try:
                owner = await state.runs.owner(rest)
            except StoreError as exc:
                state.health.failed(exc.operation, exc)
                raise StoreUnavailable("The usage store is unavailable.") from exc
            if owner is None or owner[0] != principal.key_id:
                raise NotFound("No such run.")  # SPEC: another key's run does not exist for you
            # The poll names no model (GET, no body): meter and price its result under the model
            # the run was created with (issue #3: polls were metered as model "" at cost 0).
            model = owner[2]

    uid = os.urandom(12).hex()
    call = Call(
        cfg=cfg, provider=provider, principal=principal,
        request_id=client_request_id(headers) or uid, uid=uid, t0=t0, method=method,
        raw_path=scope.get("raw_path") or path.encode(), query=scope.get("query_string", b""),
        body_bytes=body_bytes, body=body, model=model, metered=metered,
        inject_usage=inject, async_create=async_create,
        poll_uid=poll_uid,
    )
    await admit(state, call)
    call.body = None  # read by admission only; finish re-parses body_bytes if it must estimate
    return call


async def admit(state: AppState, call: Call) -> None:
    """One limiter round trip; raises the SPEC's 429 or 503 when the request may not pass."""
    p = call.principal
    tokens = reservation(call.cfg, call.body, len(call.body_bytes))
    # Reserve every token at the output price (an upper bound that settlement corrects), with the
    # price table's precomputed nano-USD rates: no Decimal arithmetic per request.
    cost = call.cfg.prices.cost_nano(call.model, Usage(completion=tokens))[0] if call.model and tokens else 0
    adm = Admission(request_id=call.uid, key_id=p.key_id, user=p.user, key_limits=p.limits,
                    user_limits=p.user_limits, tokens=tokens, cost_nano=cost)
    try:
        decision = await state.limiter.admit(adm)
    except StoreError as exc:
        state.health.failed(exc.operation, exc)
        if call.cfg.store.on_error == "closed":
            raise StoreUnavailable("The rate-limit store is unavailable.") from exc
        return  # fail open: served without limits, nothing reserved to settle
    state.health.ok()
    if not decision.allowed:
        limit = decision.limit or "requests"
        state.metrics.rate_limited.labels(p.key_id, p.user, limit).inc()
        if decision.too_large:
            raise RequestTooLarge(
                f"Request too large: it needs about {tokens} tokens, more than the tokens-per-minute "
                f"capacity of this key or user. Reduce max_tokens or the prompt.")
        if limit in _BUDGETS:
            raise QuotaExceeded(f"You exceeded your {limit.replace('_', ' ')} budget.", limit=limit,
                                now=time.time())
        raise RateLimited(f"Rate limit reached for {limit}. Try again later.", limit=limit,
                          retry_after_s=decision.retry_after_s)
    call.adm = adm
    call.decision = decision
