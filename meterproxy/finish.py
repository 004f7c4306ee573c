"""Metering one forwarded request: decide its usage (provider's, or estimated) and settle the
reservation — `settle`, which the forwarder awaits before the answer's last byte so that a client's
next request sees it (docs/api.md "Read-your-writes") — then, after the last byte, write the ledger record
and the metrics (`finish`, in the handler's `finally`, so errors, broken streams and client
disconnects are metered and settled too)."""

from __future__ import annotations

import asyncio
import logging
import time
from time import perf_counter
from typing import Any

from meterproxy import logs
from meterproxy.auth import authenticate
from meterproxy.config import Config
from meterproxy.errors import AuthError, ProxyError
from meterproxy.ledger import UsageRecord
from meterproxy.limits import Admission, StoreError
from meterproxy.metering.body import text_in_json
from meterproxy.metering.estimate import encoding_ready, estimate_usage
from meterproxy.metering.usage import Usage
from meterproxy.pricing import nano_to_usd
from meterproxy.record import Call, Outcome
from meterproxy.request import PRINCIPAL
from meterproxy.state import AppState

log = logging.getLogger("meterproxy")

CLIENT_CLOSED = 499  # nginx's convention for "client closed the request"
_BIG_PROMPT = 32_768  # bytes of body beyond which tokenising moves off the event loop


def _estimate(call: Call, out: Outcome) -> Usage:
    # The parsed body is not kept past admission (a few KB per open stream): estimate_usage parses
    # it again, on the rare path with no provider usage.
    text = out.scanner.completion_text() if out.scanner is not None else text_in_json(out.json)
    return estimate_usage(call.body_bytes if call.metered else b"", call.model, text)


async def _usage(state: AppState, call: Call, out: Outcome) -> Usage:
    ok = 200 <= out.status < 300
    if call.async_create:
        uid = out.json.get("uid") if isinstance(out.json, dict) else None
        if ok and isinstance(uid, str):
            await state.runs.remember(uid, call.principal.key_id, call.principal.user,
                                      call.provider.runs_ttl_s, call.model)  # polls are priced by it
        # A run is metered when its finished result is polled, not when it is created.
        return Usage()
    if call.poll_uid is not None:
        if out.usage is not None and await state.runs.claim_metering(call.poll_uid,
                                                                     call.provider.runs_ttl_s):
            return out.usage
        return Usage()
    if out.usage is not None:
        return out.usage
    # No usage arrived. Estimate whenever the provider may have done work: it answered 2xx, or
    # the stream broke, or the client left after the request went upstream.
    if call.metered and out.sent_upstream and (ok or out.broken or out.client_gone):
        # A vocabulary's first load takes ~0.5 s: done on the event loop it stalled every request
        # in flight and held a disconnected client's concurrency lease that long (issue #4).
        if len(call.body_bytes) > _BIG_PROMPT or not encoding_ready(call.model):
            return await asyncio.to_thread(_estimate, call, out)
        return _estimate(call, out)
    return Usage()


async def finish(state: AppState, call: Call, out: Outcome) -> None:
    """Meter one forwarded request. Never raises: a metering fault must not break the response."""
    try:
        await _finish(state, call, out)
    except Exception:
        log.exception("metering failed for request %s", call.request_id)


async def _decide(state: AppState, call: Call, out: Outcome) -> Usage:
    usage = out.billed
    if usage is not None:
        return usage
    try:
        usage = await _usage(state, call, out)
    except StoreError as exc:
        state.health.failed(exc.operation, exc)
        usage = out.usage or Usage()
    except Exception:   # e.g. an estimate that failed: record what arrived rather than nothing
        log.exception("usage of request %s undetermined; recording what arrived", call.request_id)
        usage = out.usage or Usage()
    # Only what is metered (a metered endpoint, a run's poll) is priced: pass-through needs no price.
    priceable = call.model and (call.metered or call.poll_uid is not None)
    out.cost_nano, out.priced = call.cfg.prices.cost_nano(call.model, usage) if priceable else (0, True)
    out.billed = usage
    return usage


async def settle(state: AppState, call: Call, out: Outcome) -> None:
    """Decide the usage and send the settlement to the limiter, once. The forwarder awaits this
    before the answer's last byte; `finish` calls it for answers that ended otherwise. A store
    failure schedules a retry instead of raising."""
    if out.settled:
        return
    t0 = perf_counter()
    out.settling = True
    try:
        usage = await _decide(state, call, out)
        out.settled = True
        adm = call.adm
        if adm is None and state.outage is not None:   # served open while the store was down
            state.outage.add(call.principal.key_id, call.principal.user, usage.total, out.cost_nano,
                             time.time())
        if adm is not None:
            try:
                await state.limiter.settle(adm, usage.total, out.cost_nano)
            except StoreError as exc:
                state.health.failed(exc.operation, exc)
                _settle_later(state, adm, usage.total, out.cost_nano)
    finally:
        out.settling = False
        call.overhead += perf_counter() - t0


def _settle_later(state: AppState, adm: Admission, tokens: int, cost_nano: int) -> None:
    """Retry a failed settlement in the background (it is idempotent), for about a minute.

    Giving up at once left the request's concurrency lease held until `lease_ttl_s` (15 min by
    default) and its reservation charged instead of the real usage: a store hiccup of a second as
    two streams ended locked a key with concurrency 2 out for 15 minutes (issue #7). The task is
    one of `state.tasks`, which shutdown waits for."""
    async def retry() -> None:
        delay = 0.25
        for _ in range(10):       # 0.25 + 0.5 + 1 + 2 + 4 + 8 x 5 s ≈ 48 s
            await asyncio.sleep(delay)
            try:
                await state.limiter.settle(adm, tokens, cost_nano)
                return
            except StoreError:
                delay = min(delay * 2, 8.0)
        log.warning("settlement of %s abandoned; its reservation and lease expire by themselves",
                    adm.request_id)

    task = asyncio.get_running_loop().create_task(retry())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _finish(state: AppState, call: Call, out: Outcome) -> None:
    t_fin = perf_counter()
    status = CLIENT_CLOSED if out.client_gone else (out.status or 502)
    usage = await _decide(state, call, out)
    cost_nano = out.cost_nano
    # The record and the counters before a settlement still owed (a store round trip, the only
    # await left), so that it cannot keep them from being written. Settling first once lost
    # records when it raised (CI run of 2026-11-22).
    p = call.principal
    duration = t_fin - call.t0
    # SPEC: a pass-through request (not a metered endpoint, not a run's poll) is counted in the
    # metrics but has no ledger record.
    if call.metered or call.poll_uid is not None:
        state.ledger.submit(UsageRecord(
            request_id=call.request_id, uid=call.uid, time=time.time(), key=p.key_id, user=p.user,
            provider=call.provider.name, model=call.model, status=status, source=usage.source,
            duration_ms=round(duration * 1000),
            prompt_tokens=usage.prompt, cached_prompt_tokens=usage.cached_prompt,
            completion_tokens=usage.completion, reasoning_tokens=usage.reasoning, cost_nano=cost_nano,
            cache_write_tokens=usage.cache_write, provider_cost_nano=usage.provider_cost_nano,
        ))
    m = state.metrics
    model = state.labels.label(call.model, call.cfg.prices)
    m.record_usage(key=p.key_id, user=p.user, provider=call.provider.name, model=model,
                   status=status, source=usage.source, prompt=usage.prompt,
                   cached_prompt=usage.cached_prompt, completion=usage.completion,
                   reasoning=usage.reasoning, cost_usd=nano_to_usd(cost_nano),
                   priced=out.priced,
                   cache_write=usage.cache_write)
    m.child(m.duration, call.provider.name, model, "true" if out.stream else "false").observe(duration)
    if out.ttft is not None:
        m.child(m.ttft, call.provider.name, model).observe(out.ttft)
    if out.upstream_error is not None:
        m.upstream_errors.labels(call.provider.name, out.upstream_error).inc()
        logs.upstream_failed(call.request_id, call.provider.name, call.provider.origin.host_header.decode(),
                             out.upstream_error)
    # Before settlement, the one await left: the access line cannot be lost to a store fault.
    logs.access(call.request_id, p, call.provider.name, call.model, status, usage.source, usage.prompt,
                usage.completion, cost_nano, duration, len(call.body_bytes))
    overhead = call.overhead  # settle adds its own time to call.overhead; counted once here
    await settle(state, call, out)
    m.overhead.observe(overhead + (perf_counter() - t_fin))


def record_rejection(state: AppState, cfg: Config, scope: dict[str, Any], err: ProxyError,
                     request_id: str) -> None:
    """Count and log a request the proxy answered itself, counted under its key when it was valid."""
    p = scope.get(PRINCIPAL)
    if p is None and not isinstance(err, AuthError):
        try:  # refused before authentication (its path): counted under the key if it is valid
            p = authenticate(cfg, scope["headers"])
        except ProxyError:
            p = None  # no valid key: nothing to attribute (and no label from client input)
    provider = cfg.route(scope["path"])
    logs.access(request_id, p, provider.name if provider else "-", "-",
                err.status, "-", 0, 0, 0, 0.0, 0)
    if p is not None:
        state.metrics.requests.labels(p.key_id, p.user, provider.name if provider else "none",
                                      "none", str(err.status)).inc()
