"""In-process limiter: one process, state in dicts, the same semantics as the Redis scripts.

This is a line-by-line mirror of admit.lua / settle.lua / status.lua (read redis.py's docstring
for the semantics); tests/test_limits_contract.py runs one suite over both backends. Each method
runs without awaiting, so it is atomic on the event loop. The clock is injected so tests never
sleep; budgets use it as UTC wall time, as the Redis scripts use Redis `TIME`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from datetime import date

from meterproxy.limits import Admission, Decision, Limits, RateSnapshot
from meterproxy.limits._view import CONC_RETRY_MS, UNIT, status_view

__all__ = ["MemoryLimiter"]

_DAY_MS = 86_400_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_SWEEP_MS = 60_000
# principal: ("k", user, key_id) or ("u", user, ""); state is keyed by (principal, kind)
Principal = tuple[str, str, str]


@functools.lru_cache(maxsize=64)
def calendar_of(days: int) -> tuple[str, str, int, int]:
    """(day id, month id, day end ms, month end ms) of a day counted from the epoch, UTC."""
    d = date.fromordinal(days + _EPOCH_ORDINAL)
    nxt = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    iso = d.isoformat()
    return iso, iso[:7], (days + 1) * _DAY_MS, (nxt.toordinal() - _EPOCH_ORDINAL) * _DAY_MS


def _snap(cap: int | None, u: int) -> tuple[int | None, int | None, float]:
    if cap is None:
        return None, None, 0.0
    return cap, max((cap * UNIT - u) // UNIT, 0), -(-u // cap) / 1000


class MemoryLimiter:
    """`Limiter` kept in this process. `clock` returns epoch seconds (time.time by default)."""

    def __init__(self, clock: Callable[[], float] = time.time, *, lease_ttl_s: float = 900.0,
                 reservation_ttl_s: float = 3600.0) -> None:
        self._clock = clock
        self._lease_ms = int(lease_ttl_s * 1000)
        self._res_ms = int(reservation_ttl_s * 1000)
        self._buckets: dict[tuple[Principal, str], tuple[int, int, int]] = {}  # used, stamp, exp
        self._leases: dict[Principal, dict[str, int]] = {}  # request_id -> deadline
        self._budgets: dict[tuple[Principal, str], list[int | str]] = {}  # wid, tok, usd, exp
        self._res: dict[tuple[str, str], tuple[int, int, str, str, int]] = {}
        self._next_sweep = 0

    def _now(self) -> int:
        return round(self._clock() * 1000)

    def _used(self, k: tuple[Principal, str], cap: int, now: int) -> int:
        e = self._buckets.get(k)
        if e is None or now >= e[2]:
            return 0  # an idle bucket is full
        return max(e[0] - max(now - e[1], 0) * cap, 0)

    def _put(self, k: tuple[Principal, str], cap: int, u: int, now: int) -> None:
        self._buckets[k] = (u, now, now + -(-u // cap) + 1000)

    def _budget(self, k: tuple[Principal, str], wid: str) -> tuple[int, int]:
        e = self._budgets.get(k)
        if e is None or e[0] != wid:
            return 0, 0
        return int(e[1]), int(e[2])

    def _sweep(self, now: int) -> None:
        """Drop expired state now and then, as Redis expiry would."""
        self._next_sweep = now + _SWEEP_MS
        for bk in [k for k, v in self._buckets.items() if v[2] <= now]:
            del self._buckets[bk]
        for p, ls in list(self._leases.items()):
            for rid in [r for r, d in ls.items() if d <= now]:
                del ls[rid]
            if not ls:
                del self._leases[p]
        for gk in [k for k, v in self._budgets.items() if int(v[3]) <= now]:
            del self._budgets[gk]
        for rk in [k for k, v in self._res.items() if v[4] <= now]:
            del self._res[rk]

    async def admit(self, adm: Admission) -> Decision:
        """Check every limit of key and user; if all pass, charge them all (see redis.py)."""
        kl, ul, tokens = adm.key_limits, adm.user_limits, adm.tokens
        if (kl.tpm is not None and tokens > kl.tpm) or (ul.tpm is not None and tokens > ul.tpm):
            return Decision(False, "tokens", None, True)
        now = self._now()
        if now >= self._next_sweep:
            self._sweep(now)
        kp: Principal = ("k", adm.user, adm.key_id)
        up: Principal = ("u", adm.user, "")
        principals = ((kp, kl), (up, ul))

        cal = None
        if any(lim.daily_tokens is not None or lim.daily_usd_nano is not None
               or lim.monthly_tokens is not None or lim.monthly_usd_nano is not None
               for _, lim in principals):
            cal = calendar_of(now // _DAY_MS)
        budget_deny = self._budget_check(principals, cal)

        deny, wait = None, -1
        used: dict[tuple[Principal, str], int] = {}
        charges: list[tuple[tuple[Principal, str], int, int]] = []  # bucket, capacity, new use
        for p, lim in principals:
            for kind, cap, units, name in (("rpm", lim.rpm, UNIT, "requests"),
                                           ("tpm", lim.tpm, tokens * UNIT, "tokens")):
                if cap is None:
                    continue
                u = used[(p, kind)] = self._used((p, kind), cap, now)
                charges.append(((p, kind), cap, u + units))
                need = u + units - cap * UNIT
                if need > 0 and -(-need // cap) > wait:
                    deny, wait = name, -(-need // cap)
            if lim.concurrency is not None:
                ls = self._leases.get(p)
                if ls:
                    for rid in [r for r, d in ls.items() if d <= now]:
                        del ls[rid]
                if ls and len(ls) >= lim.concurrency and wait < CONC_RETRY_MS:
                    deny, wait = "concurrency", CONC_RETRY_MS

        allowed = budget_deny is None and deny is None
        if allowed:
            for bk, cap, u in charges:
                self._put(bk, cap, u, now)
                used[bk] = u
            self._charge(adm, principals, now, cal)
        r_cap, r_u = (kl.rpm, used.get((kp, "rpm"), 0)) if kl.rpm is not None else \
            (ul.rpm, used.get((up, "rpm"), 0))
        t_cap, t_u = (kl.tpm, used.get((kp, "tpm"), 0)) if kl.tpm is not None else \
            (ul.tpm, used.get((up, "tpm"), 0))
        snap = RateSnapshot(*_snap(r_cap, r_u), *_snap(t_cap, t_u))
        if allowed:
            return Decision(True, snapshot=snap)
        if budget_deny is not None:
            return Decision(False, budget_deny, None, snapshot=snap)
        return Decision(False, deny, wait / 1000, snapshot=snap)

    def _budget_check(self, principals: tuple[tuple[Principal, Limits], ...],
                      cal: tuple[str, str, int, int] | None) -> str | None:
        """The first spent budget (used >= limit), key before user, day before month."""
        if cal is None:
            return None
        for p, lim in principals:
            for kind, wid, ltok, lusd, ntok, nusd in (
                ("d", cal[0], lim.daily_tokens, lim.daily_usd_nano, "daily_tokens", "daily_usd"),
                ("m", cal[1], lim.monthly_tokens, lim.monthly_usd_nano,
                 "monthly_tokens", "monthly_usd"),
            ):
                if ltok is None and lusd is None:
                    continue
                ut, uc = self._budget((p, kind), wid)
                if ltok is not None and ut >= ltok:
                    return ntok
                if lusd is not None and uc >= lusd:
                    return nusd
        return None

    def _charge(self, adm: Admission, principals: tuple[tuple[Principal, Limits], ...], now: int,
                cal: tuple[str, str, int, int] | None) -> None:
        """Take leases, budget reservations and the reservation record of an admission."""
        for p, lim in principals:
            if lim.concurrency is not None:
                self._leases.setdefault(p, {})[adm.request_id] = now + self._lease_ms
            if cal is None:
                continue
            for kind, wid, end, on in (
                ("d", cal[0], cal[2], lim.daily_tokens is not None
                 or lim.daily_usd_nano is not None),
                ("m", cal[1], cal[3], lim.monthly_tokens is not None
                 or lim.monthly_usd_nano is not None),
            ):
                if not on:
                    continue
                e = self._budgets.get((p, kind))
                if e is not None and e[0] == wid:
                    e[1] = int(e[1]) + adm.tokens
                    e[2] = int(e[2]) + adm.cost_nano
                else:
                    self._budgets[(p, kind)] = [wid, adm.tokens, adm.cost_nano, end]
        self._res[(adm.user, adm.request_id)] = (
            adm.tokens, adm.cost_nano, cal[0] if cal else "-", cal[1] if cal else "-",
            now + self._res_ms)

    async def settle(self, adm: Admission, tokens: int, cost_nano: int) -> None:
        """Replace the reservation by real usage where it was charged; release the leases."""
        kp: Principal = ("k", adm.user, adm.key_id)
        up: Principal = ("u", adm.user, "")
        for p in (kp, up):
            ls = self._leases.get(p)
            if ls is not None:
                ls.pop(adm.request_id, None)
        now = self._now()
        rec = self._res.pop((adm.user, adm.request_id), None)
        if rec is None or rec[4] <= now:
            return
        dtok, dcost = tokens - rec[0], cost_nano - rec[1]
        if dtok:
            for p, cap in ((kp, adm.key_limits.tpm), (up, adm.user_limits.tpm)):
                if cap is not None:
                    # a refund never lifts a bucket above capacity; a charge may leave debt
                    u = max(self._used((p, "tpm"), cap, now) + dtok * UNIT, 0)
                    self._put((p, "tpm"), cap, u, now)
        for p in (kp, up):
            for kind, wid in (("d", rec[2]), ("m", rec[3])):
                e = self._budgets.get((p, kind))
                if wid == "-" or e is None or e[0] != wid:
                    continue  # that window rolled over: nothing left to correct
                e[1] = max(int(e[1]) + dtok, 0)
                e[2] = max(int(e[2]) + dcost, 0)

    async def status(self, key_id: str, user: str, key_limits: Limits,
                     user_limits: Limits) -> dict[str, dict[str, float | int | None]]:
        """The key's configured limits with what remains and when each resets (GET /usage)."""
        now = self._now()
        kp: Principal = ("k", user, key_id)
        lim = key_limits
        days = now // _DAY_MS
        day_id, mon_id, day_end, mon_end = calendar_of(days)
        dt, du = self._budget((kp, "d"), day_id)
        mt, mu = self._budget((kp, "m"), mon_id)
        leases = sum(1 for d in self._leases.get(kp, {}).values() if d > now)
        return status_view(lim, [
            self._used((kp, "rpm"), lim.rpm, now) if lim.rpm is not None else 0,
            self._used((kp, "tpm"), lim.tpm, now) if lim.tpm is not None else 0,
            leases, dt, du, day_end - now, mt, mu, mon_end - now])

    def preload(self, rows: Iterable[tuple[str, str, int, int, int]]) -> None:
        """Budgets at start: add this month's usage, rows of (user, key, epoch day, tokens,
        cost_nano) from the ledger, so a restart does not hand out spent budgets again."""
        for user, key_id, day, tokens, cost in rows:
            self._add(user, key_id, day, tokens, cost)

    def _add(self, user: str, key_id: str, day: int, tokens: int, cost: int) -> None:
        day_id, mon_id, day_end, mon_end = calendar_of(day)
        for p in (("k", user, key_id), ("u", user, "")):
            for kind, wid, end in (("d", day_id, day_end), ("m", mon_id, mon_end)):
                e = self._budgets.get((p, kind))
                if e is not None and e[0] == wid:
                    e[1] = int(e[1]) + tokens
                    e[2] = int(e[2]) + cost
                elif e is None or str(e[0]) < wid:   # an older window is replaced, a newer kept
                    self._budgets[(p, kind)] = [wid, tokens, cost, end]

    async def charge(self, key_id: str, user: str, tokens: int, cost_nano: int, day: int,
                     charge_id: str) -> None:
        """Add usage of epoch day `day` to the budgets (the Redis limiter's catch-up path;
        in process it never fails, so nothing needs catching up)."""
        self._add(user, key_id, day, tokens, cost_nano)

    async def close(self) -> None:
        """Nothing to release."""
