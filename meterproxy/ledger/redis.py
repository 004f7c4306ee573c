"""Redis ledger store: records in a capped stream, aggregates in per-user hashes.

Layout. Per-user keys share the hash tag `{u:<user>}`, the record keys the tag `{records}`:

    mp:{u:<user>}:agg:<YYYY-MM-DD>    day hash, fields "<key>|<provider>|<model>|<counter>"
    mp:{u:<user>}:agg:<YYYY-MM>       month hash, same fields
    mp:{u:<user>}:days                zset of the user's days (member ISO date, score epoch day)
    mp:{u:<user>}:seen:<uid>          dedupe marker of the aggregates write
    mp:{records}                      stream of records; ids are "<record ms>-<seq>" (see _RECORD)
    mp:{records}:lag:<YYYY-MM-DD>     max (id ms - record ms) of that day's records: bounds scans
    mp:{records}:users                every user with usage
    mp:{records}:seen:<uid>           dedupe marker of the stream write

A record is written by two scripts, one per slot, each atomic and idempotent on its own marker
(SET NX inside the script), so a retried batch — after a timeout that did commit, or that
committed one half — never counts twice. A batch is one pipeline of those calls: one round trip
on a single node (one write on a WireRedis, store/wire.py, when the store has one); on Redis
Cluster (`redis+cluster://`) redis-py sends one pipeline per node. Reads always go through
redis-py.
The stream is one key, so on a cluster every record write also lands on that key's node.

The markers cost ~200 bytes per request for `dedupe_ttl_s` (default an hour: a retry comes
within a second of the store answering again, so an hour only fails to dedupe a batch whose
reply was lost and whose store then stayed unreachable for over an hour). Run the ledger's
Redis with noeviction or volatile-*: allkeys-* eviction could drop aggregates or markers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from meterproxy.ledger.record import (
    AGG_FIELDS,
    DAY_S,
    Cell,
    Totals,
    UsageRecord,
    day_num,
    day_str,
    month_str,
    parse_id,
)
from meterproxy.limits import StoreError
from meterproxy.limits.redis import CLIENT_FAILURES
from meterproxy.store.wire import Arg, WireRedis

T = TypeVar("T")

DAY_TTL_S = 400 * DAY_S
MONTH_TTL_S = 5 * 366 * DAY_S
STREAM = "mp:{records}"
USERS = "mp:{records}:users"

# KEYS: seen, day hash, month hash, days zset.
# ARGV: seen ttl, day ttl, month ttl, epoch day, day iso, field prefix, 6 counters (AGG_FIELDS).
_AGGREGATE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local names = {'req', 'pt', 'cpt', 'ct', 'rt', 'cost'}
for i = 1, 6 do
  local v = tonumber(ARGV[6 + i])
  if v ~= 0 then
    redis.call('HINCRBY', KEYS[2], ARGV[6] .. names[i], v)
    redis.call('HINCRBY', KEYS[3], ARGV[6] .. names[i], v)
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[3])
local dn = tonumber(ARGV[4])
redis.call('ZADD', KEYS[4], dn, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (dn - 400))
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
"""

# KEYS: seen, stream, lag, users.  ARGV: seen ttl, lag ttl, user, record ms, maxlen, fields...
_RECORD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('SADD', KEYS[4], ARGV[3])
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
-- Prefer the record's own time as the id, so time ranges map to id ranges; when that would
-- not be increasing (a late record), let Redis pick the next id: either way id >= record time.
local id = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], ARGV[4] .. '-*', unpack(fields))
if type(id) == 'table' and id.err then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
end
local lag = tonumber(string.match(id, '^(%d+)')) - tonumber(ARGV[4])
if lag > tonumber(redis.call('GET', KEYS[3]) or '0') then
  redis.call('SET', KEYS[3], lag, 'EX', ARGV[2])
end
return 1
"""

_REC_FIELDS = ("rid", "t", "k", "u", "p", "m", "s", "src", "d", "pt", "cpt", "ct", "rt", "cost")
_SCAN_CHUNK = 5_000


def _esc(s: str) -> str:
    """Escape the characters that delimit hash fields and hash tags."""
    return s.replace("%", "%25").replace("|", "%7C").replace("{", "%7B").replace("}", "%7D")


def _unesc(s: str) -> str:
    return s.replace("%7D", "}").replace("%7B", "{").replace("%7C", "|").replace("%25", "%")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ukey(user: str, suffix: str) -> str:
    return f"mp:{{u:{_esc(user)}}}:{suffix}"


def _to_stream(rec: UsageRecord) -> list[str | int]:
    vals = (rec.request_id, repr(rec.time), rec.key, rec.user, rec.provider, rec.model,
            rec.status, rec.source, rec.duration_ms, rec.prompt_tokens,
            rec.cached_prompt_tokens, rec.completion_tokens, rec.reasoning_tokens, rec.cost_nano)
    out: list[str | int] = []
    for name, v in zip(_REC_FIELDS, vals, strict=True):
        out += [name, v if isinstance(v, int) else str(v)]
    return out


def _from_stream(raw: dict[Any, Any]) -> UsageRecord:
    f = {_s(k): _s(v) for k, v in raw.items()}
    return UsageRecord(
        request_id=f["rid"], time=float(f["t"]), key=f["k"], user=f["u"], provider=f["p"],
        model=f["m"], status=int(f["s"]), source=f["src"], duration_ms=int(f["d"]),
        prompt_tokens=int(f["pt"]), cached_prompt_tokens=int(f["cpt"]),
        completion_tokens=int(f["ct"]), reasoning_tokens=int(f["rt"]), cost_nano=int(f["cost"]),
    )


def _cells(user: str, period: str, raw: dict[Any, Any]) -> list[Cell]:
    """Parse one aggregate hash into cells."""
    by_dims: dict[tuple[str, str, str], list[int]] = {}
    for k, v in raw.items():
        key, provider, model, name = _s(k).split("|")
        counters = by_dims.setdefault((_unesc(key), _unesc(provider), _unesc(model)), [0] * 6)
        counters[AGG_FIELDS.index(name)] = int(v)
    return [Cell(user, k, p, m, period, Totals(*c)) for (k, p, m), c in by_dims.items()]


class RedisStore:
    """The ledger on Redis. Every call is bounded by `timeout`; failures raise StoreError.

    `reader` (redis-py) serves the reads, and the writes unless a WireRedis `writer` is given:
    then each batch is one write and one read of replies on the writer's own connection.
    `close()` closes the reader only with `close_reader` (it was opened for this store, see
    `meterproxy.ledger.redis_store`); the caller owns the other clients.
    """

    def __init__(self, reader: Redis | RedisCluster, writer: WireRedis | None = None,
                 *, close_reader: bool = False, max_records: int = 1_000_000,
                 dedupe_ttl_s: int = 3600, timeout: float = 5.0) -> None:
        self._close_reader = close_reader
        self._r = reader
        self._w = writer
        self._max_records = max_records
        self._dedupe_ttl_s = dedupe_ttl_s
        self._timeout = timeout
        self._shas: tuple[str, str] | None = None

    async def _call(self, op: str, aw: Awaitable[T]) -> T:
        """Await a Redis operation within the timeout, mapping failures to StoreError."""
        try:
            async with asyncio.timeout(self._timeout):
                return await aw
        except (*CLIENT_FAILURES, TimeoutError) as exc:
            raise StoreError(op, f"{type(exc).__name__}: {exc}") from exc

    def _args(self, rec: UsageRecord) -> tuple[list[Any], list[Any]]:
        """The (aggregate, record) script arguments of one record: numkeys, keys, argv."""
        dn = day_num(rec.time)
        day = day_str(dn)
        agg_keys = [_ukey(rec.user, f"seen:{rec.dedupe_id}"), _ukey(rec.user, f"agg:{day}"),
                    _ukey(rec.user, f"agg:{month_str(rec.time)}"), _ukey(rec.user, "days")]
        prefix = f"{_esc(rec.key)}|{_esc(rec.provider)}|{_esc(rec.model)}|"
        agg = [4, *agg_keys, self._dedupe_ttl_s, DAY_TTL_S, MONTH_TTL_S, dn, day, prefix,
               *Totals.of(rec).values()]
        rec_keys = [f"{STREAM}:seen:{rec.dedupe_id}", STREAM, f"{STREAM}:lag:{day}", USERS]
        row = [4, *rec_keys, self._dedupe_ttl_s, DAY_TTL_S, rec.user, int(rec.time * 1000),
               self._max_records, *_to_stream(rec)]
        return agg, row

    async def _load(self) -> tuple[str, str]:
        if self._shas is None:
            if self._w is not None:
                agg, rec = await self._call("ledger_write", self._w.execute_many(
                    [("SCRIPT", "LOAD", _AGGREGATE), ("SCRIPT", "LOAD", _RECORD)],
                    raise_on_error=True))
            else:
                # On a cluster, redis-py sends SCRIPT LOAD to every primary.
                agg = await self._call("ledger_write", self._r.script_load(_AGGREGATE))
                rec = await self._call("ledger_write", self._r.script_load(_RECORD))
            self._shas = (_s(agg), _s(rec))
        return self._shas

    async def write(self, batch: Sequence[UsageRecord]) -> None:
        """Store a batch in one round trip (per node); idempotent per record dedupe_id."""
        if not batch:
            return
        args = [self._args(rec) for rec in batch]
        for _ in range(2):
            agg_sha, rec_sha = await self._load()
            if self._w is not None:
                cmds: list[tuple[Arg, ...]] = []
                for agg, row in args:
                    cmds += [("EVALSHA", agg_sha, *agg), ("EVALSHA", rec_sha, *row)]
                results = await self._call("ledger_write", self._w.execute_many(cmds))
            else:
                pipe = self._r.pipeline(transaction=False)
                for agg, row in args:
                    pipe.execute_command("EVALSHA", agg_sha, *agg)
                    pipe.execute_command("EVALSHA", rec_sha, *row)
                results = await self._call("ledger_write", pipe.execute(raise_on_error=False))
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            # Redis restarted or flushed its scripts: reload and resend the whole batch,
            # which is safe because every write in it is idempotent.
            self._shas = None
        for r in results:
            if isinstance(r, Exception):
                raise StoreError("ledger_write", f"{type(r).__name__}: {r}") from r

    async def day_cells(self, user: str | None, first: int | None,
                        last: int | None) -> list[Cell]:
        """Day aggregates of days first..last (inclusive) of `user` or everyone."""
        if user is not None:
            users = [user]
        else:
            users = sorted(_s(u) for u in await self._call("ledger_read", self._r.smembers(USERS)))
        lo = "-inf" if first is None else first
        hi = "+inf" if last is None else last
        pipe = self._r.pipeline(transaction=False)
        for u in users:
            pipe.zrangebyscore(_ukey(u, "days"), lo, hi)
        days = await self._call("ledger_read", pipe.execute())
        wanted = [(u, _s(d)) for u, ds in zip(users, days, strict=True) for d in ds]
        pipe = self._r.pipeline(transaction=False)
        for u, d in wanted:
            pipe.hgetall(_ukey(u, f"agg:{d}"))
        raws = await self._call("ledger_read", pipe.execute())
        return [c for (u, d), raw in zip(wanted, raws, strict=True) for c in _cells(u, d, raw)]

    async def period_cells(self, user: str, periods: Sequence[str]) -> list[list[Cell]]:
        """Aggregates of `user` for each period, in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for p in periods:
            pipe.hgetall(_ukey(user, f"agg:{p}"))
        raws = await self._call("ledger_read", pipe.execute())
        return [_cells(user, p, raw) for p, raw in zip(periods, raws, strict=True)]

    async def scan(self, start: float, end: float) -> list[UsageRecord]:
        """Records with start <= time < end, read from the stream by id range."""
        days = [day_str(d) for d in range(day_num(start), day_num(math.nextafter(end, 0)) + 1)]
        lags = await self._call("ledger_read", self._r.mget([f"{STREAM}:lag:{d}" for d in days]))
        # An id is never earlier than its record's time, and at most the day's max lag later.
        hi = math.ceil(end * 1000) + max((int(x) for x in lags if x is not None), default=0)
        lo = f"{int(start * 1000)}-0"
        out: list[UsageRecord] = []
        while True:
            chunk = await self._xrange(lo, str(hi), _SCAN_CHUNK)
            out += [r for _, r in chunk if start <= r.time < end]
            if len(chunk) < _SCAN_CHUNK:
                return out
            lo = "(" + chunk[-1][0]

    async def records(self, since_id: str | None, limit: int) -> list[tuple[str, UsageRecord]]:
        """Up to `limit` records after `since_id`, oldest first."""
        if since_id is None:
            lo = "-"
        else:
            ms, seq = parse_id(since_id)
            lo = f"({ms}-{seq}"
        return await self._xrange(lo, "+", limit)

    async def _xrange(self, lo: str, hi: str, count: int) -> list[tuple[str, UsageRecord]]:
        raw: Any = await self._call("ledger_read", self._r.xrange(STREAM, lo, hi, count=count))
        return [(_s(i), _from_stream(fields)) for i, fields in raw or ()]

    async def close(self) -> None:
        """Close the reader the store opened itself, if any; the caller owns the others."""
        if self._close_reader:
            await self._r.aclose()
