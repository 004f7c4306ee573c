"""Backend-neutral pieces: bucket units and the GET /usage status view."""

from __future__ import annotations

from meterproxy.limits import Limits

UNIT = 60000  # bucket units per token: refill is then `capacity` units per ms, exact integers
CONC_RETRY_MS = 1000  # a full concurrency slot frees when some request ends: no better estimate


def status_view(lim: Limits, r: list[int]) -> dict[str, dict[str, float | int | None]]:
    """Shape status figures {rpm used, tpm used, leases, day tok, day usd, day left ms, month tok,
    month usd, month left ms} (bucket use in 1/60000 token units) into the GET /usage view."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name, cap, u in (("requests", lim.rpm, r[0]), ("tokens", lim.tpm, r[1])):
        if cap is not None:
            rem = max((cap * UNIT - u) // UNIT, 0)
            out[name] = {"limit": cap, "remaining": rem, "reset_s": -(-u // cap) / 1000}
    if lim.concurrency is not None:
        out["concurrency"] = {"limit": lim.concurrency,
                              "remaining": max(lim.concurrency - r[2], 0), "reset_s": None}
    for name, cap, used, left, usd in (
        ("daily_tokens", lim.daily_tokens, r[3], r[5], False),
        ("monthly_tokens", lim.monthly_tokens, r[6], r[8], False),
        ("daily_usd", lim.daily_usd_nano, r[4], r[5], True),
        ("monthly_usd", lim.monthly_usd_nano, r[7], r[8], True),
    ):
        if cap is not None:
            rem = max(cap - used, 0)
            out[name] = ({"limit": cap / 1e9, "remaining": rem / 1e9, "reset_s": left / 1000}
                         if usd else {"limit": cap, "remaining": rem, "reset_s": left / 1000})
    return out
