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
from meterproxy.bodies import check_model_id, form_fields, form_models, json_object, with_include_usage
from meterproxy.config import Config, Principal
from meterproxy.endpoints import Endpoint, check_path, classify, normalise, path_model
from meterproxy.errors import (
    BodyTooLarge,
    InvalidJSON,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotPriced,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UnknownRoute,
)
from meterproxy.headers import client_request_id
from meterproxy.limits import Admission, StoreError
from meterproxy.metering.reserve import MAX_N, reservation_tokens
from meterproxy.metering.usage import Usage
from meterproxy.record import Call
from meterproxy.runs import run_path_uid
from meterproxy.state import AppState

_BUDGETS = frozenset({"daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd"})


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


def reservation(cfg: Config, body: dict[str, Any] | None, body_len: int) -> int:
    """Tokens to reserve (meterproxy/metering/reserve.py: every family's max-output fields)."""
    return reservation_tokens(body, body_len, cfg.server.default_max_tokens)


def _check_models(principal: Principal, headers: list[tuple[bytes, bytes]], path: str,
                  parsed: dict[str, Any] | None, body: bytes, metered: bool, method: str) -> str:
    """Every model the request names (its path, Gemini style; its JSON body, a message batch's
    requests; a form's `model` field, a batch input file's lines) within the length bound and the
    key's allowlist; returns the one to meter under."""
    in_path = path_model(path)
    in_body: str | None = None
    if parsed is not None and ("model" in parsed or metered):
        value = parsed.get("model")
        in_body = value if isinstance(value, str) else ""
    named = [m for m in (in_path, in_body) if m is not None]
    if parsed is None and principal.models is not None and method != "GET":
        fields = form_fields(headers, body)   # a form is read only to enforce an allowlist
        if fields is not None:
            in_form = form_models(fields)     # its `model` field first, then batch file lines
            named += in_form
            in_body = in_form[0] if "model" in fields else None
    if parsed is not None and isinstance(parsed.get("requests"), list):
        # A message batch (Anthropic): each request names its model in `params`.
        named += [r["params"]["model"] if isinstance(r["params"].get("model"), str) else ""
                  for r in parsed["requests"] if isinstance(r, dict) and isinstance(r.get("params"), dict)]
    for model in named:
        check_model_id(model)
        if not principal.allows_model(model):
            raise ModelNotAllowed(f"The model '{model[:200]}' is not allowed for this key.")
    return in_path or in_body or ""


async def prepare(state: AppState, cfg: Config, scope: dict[str, Any], receive: Any) -> Call:
    """Everything up to (not including) the upstream request. Raises ProxyError or ClientGone."""
    t0 = perf_counter()
    path: str = scope["path"]
    _reject_traversal(path)
    raw_path: bytes = scope.get("raw_path") or path.encode()
    check_path(path, raw_path)
    provider = cfg.route(path)
    if provider is None:
        raise UnknownRoute(f"No provider is configured for {path}.")
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    principal = scope[PRINCIPAL] = authenticate(cfg, headers)  # a rejection below is counted under it
    method: str = scope["method"]
    body_bytes = await read_body(receive, cfg.server.max_body_bytes, headers)
    norm = normalise(path)
    endpoint: Endpoint | None = classify(norm) if method == "POST" else None
    metered = endpoint is not None
    # Every JSON object body is read, metered or not: the model it names is allowlisted on every
    # provider path (issue #14), and an ambiguous body is refused before anything is forwarded.
    parsed = json_object(body_bytes)
    if metered and parsed is None:
        try:
            orjson.loads(body_bytes)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSON("We could not parse the JSON body of your request.") from exc
        raise InvalidJSON("The request body must be a JSON object.")
    body = parsed if metered else None
    model = _check_models(principal, headers, norm, parsed, body_bytes, metered, method)
    if body is not None:
        n = body.get("n")
        if isinstance(n, int | float) and not isinstance(n, bool) and n > MAX_N:
            # Reserving for at most MAX_N while forwarding n=10**6 let one request cost far more
            # than it reserved (issue #14): beyond the cap it is refused.
            raise InvalidRequest(f"n must be at most {MAX_N}.", param="n")
    if body is not None and cfg.server.unpriced == "refuse" and cfg.prices.lookup(model) is None:
        # Refused before anything goes upstream: a model without a price escapes dollar budgets.
        raise ModelNotPriced(f"The model '{model[:200]}' has no price; this proxy refuses unpriced models.")

    stream_requested = False
    inject = False
    async_create = False
    if body is not None:
        stream_field = body.get("stream")
        stream_requested = (stream_field is True) if "stream" in body else provider.stream_by_default
        stream_requested = stream_requested or (endpoint is not None and endpoint.path_streams)
        async_create = provider.poll_prefix is not None and body.get("async") is True
        if stream_requested and endpoint is not None and endpoint.stream_options \
                and provider.stream_usage == "inject":
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                # docs/api.md "Stream usage": ask for usage upstream, strip it from what the client sees.
                body_bytes = with_include_usage(body_bytes, body)
                inject = True

    poll_uid: str | None = None
    run = run_path_uid(provider.poll_prefix, provider.poll_suffix, norm) if provider.poll_prefix else None
    if run is not None:
        run_uid, exact = run
        try:
            owner = await state.runs.owner(run_uid) if run_uid else None
        except StoreError as exc:
            state.health.failed(exc.operation, exc)
            raise StoreUnavailable("The usage store is unavailable.") from exc
        if owner is None or owner[0] != principal.key_id:
            raise NotFound("No such run.")  # another key's run does not exist for it (docs/api.md)
        if exact and method == "GET":
            poll_uid = run_uid
            # The poll names no model (GET, no body): meter and price its result under the model
            # the run was created with (issue #3: polls were metered as model "" at cost 0).
            model = owner[2]

    uid = os.urandom(12).hex()
    call = Call(
        cfg=cfg, provider=provider, principal=principal,
        request_id=client_request_id(headers) or uid, uid=uid, t0=t0, method=method,
        raw_path=raw_path, query=scope.get("query_string", b""),
        body_bytes=body_bytes, body=body, model=model, metered=metered,
        inject_usage=inject, async_create=async_create,
        poll_uid=poll_uid, family=endpoint.family if endpoint is not None else "",
    )
    await admit(state, call)
    call.body = None  # read by admission only; finish re-parses body_bytes if it must estimate
    return call


async def admit(state: AppState, call: Call) -> None:
    """One limiter round trip; raises the documented 429 or 503 when the request may not pass."""
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
