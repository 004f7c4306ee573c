"""One request's record, filled forward: `request.prepare` makes the `Call` (what was asked, who
asked, what was reserved), the forwarder fills its `Outcome` (what happened on the wire), `finish`
decides what it cost (usage, price), settles and writes the ledger record from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meterproxy.config import Config, Principal, Provider
from meterproxy.limits import Admission, Decision
from meterproxy.metering.scan import StreamScanner
from meterproxy.metering.usage import Usage
from meterproxy.transport import Response


@dataclass(slots=True)
class Outcome:
    """What happened: filled in by the forwarder (forward.py), decided by finish.py."""

    done: bool = False
    client_gone: bool = False
    sent_upstream: bool = False
    complete: bool = False
    stream: bool = False
    broken: bool = False
    status: int = 0
    upstream_error: str | None = None
    ttft: float | None = None
    usage: Usage | None = None      # the provider's, as found in the answer
    json: Any = None
    scanner: StreamScanner | None = None
    resp: Response | None = None
    billed: Usage | None = None     # decided: the provider's, an estimate, or nothing
    cost_nano: int = 0
    priced: bool = True
    settled: bool = False           # the limiter has the settlement (or its retry is scheduled)
    settling: bool = False          # a disconnect now must not cancel the handler (see forward.py)


@dataclass(slots=True)
class Call:
    """What was asked and who asked (filled by request.prepare), and what happened (`out`)."""

    cfg: Config
    provider: Provider
    principal: Principal
    request_id: str            # x-request-id (the client's if sane)
    uid: str                   # internal, unique: reservation, lease and ledger idempotency
    t0: float
    method: str
    raw_path: bytes
    query: bytes
    body_bytes: bytes
    body: dict[str, Any] | None  # the parsed JSON body; dropped (None) once admitted
    model: str
    metered: bool
    inject_usage: bool
    async_create: bool
    poll_uid: str | None
    family: str = ""           # the metered endpoint's wire family (endpoints.py); "" = not metered
    adm: Admission | None = None
    decision: Decision | None = None
    overhead: float = 0.0
    out: Outcome = field(default_factory=Outcome)  # what happened, filled in by the forwarder
