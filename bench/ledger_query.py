"""Issue #10: /admin/usage over a month of 1,000,000 ledger records, on PostgreSQL and SQLite.

Generates the records (200 users x 2 keys, 6 models, 3 providers, spread over one month) into a
fresh SQLite file and a fresh PostgreSQL database (started here: initdb in a temp dir, pg_ctl on
an ephemeral port, stopped after), through the stores' own batch writes (so the daily aggregates
are maintained as in production), then times the queries /admin/usage runs (the same function the
endpoint calls), each the median of 5 runs. Goal: < 1 s on PostgreSQL, < 2 s on SQLite.

    .venv/bin/python bench/ledger_query.py [--records 1000000] [--only sqlite|postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meterproxy.ledger import Ledger, UsageRecord, open_ledger_store
from tests.procs import PostgresServer

MONTH0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
MONTH_S = 30 * 86_400
MODELS = [("openai", "gpt-5.4"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet"),
          ("anthropic", "claude-haiku"), ("gemini", "gemini-3.1-pro"), ("gemini", "gemini-flash")]
QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("month total", {"since": date(2026, 11, 1), "until": date(2026, 11, 30)}),
    ("month by user", {"since": date(2026, 11, 1), "until": date(2026, 11, 30), "group_by": ["user"]}),
    ("month by day,model", {"since": date(2026, 11, 1), "until": date(2026, 11, 30),
                            "group_by": ["day", "model"]}),
    ("month by user,key,model", {"since": date(2026, 11, 1), "until": date(2026, 11, 30),
                                 "group_by": ["user", "key", "model"]}),
    ("one user, month by day", {"user": "user-7", "since": date(2026, 11, 1), "until": date(2026, 11, 30),
                                "group_by": ["day"]}),
    ("partial days (10:30 .. 17:45 next day)", {
        "since": datetime(2026, 11, 10, 10, 30, tzinfo=UTC), "until": datetime(2026, 11, 11, 17, 45, tzinfo=UTC),
        "group_by": ["model"]}),
]


def records(n: int, batch: int = 5000) -> Any:
    rng = random.Random(1)
    out: list[UsageRecord] = []
    for i in range(n):
        u = rng.randrange(200)
        provider, model = MODELS[rng.randrange(len(MODELS))]
        p, c = rng.randint(10, 4000), rng.randint(1, 800)
        out.append(UsageRecord(
            request_id=f"r{i}", uid=f"u{i}", time=MONTH0 + rng.random() * MONTH_S, key=f"key-{u}-{i % 2}",
            user=f"user-{u}", provider=provider, model=model, status=200, source="provider",
            duration_ms=rng.randint(50, 9000), prompt_tokens=p, cached_prompt_tokens=p // 4,
            completion_tokens=c, reasoning_tokens=c // 5, cost_nano=p * 1250 + c * 10_000,
            team=f"team-{u % 7}"))
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out


async def bench(url: str, n: int) -> dict[str, float]:
    store = open_ledger_store(url)
    await store.migrate()
    t0 = time.perf_counter()
    for b in records(n):
        await store.write(b)
    load_s = time.perf_counter() - t0
    led = Ledger(store)
    out = {"load_s": load_s}
    for name, q in QUERIES:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            res = await led.query(**q)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
        assert res["total"]["requests"] > 0, name
    total = (await led.query(since=date(2026, 11, 1), until=date(2026, 11, 30)))["total"]["requests"]
    assert total == n, total
    await store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records to generate (default 1,000,000)")
    ap.add_argument("--only", choices=("sqlite", "postgres"), help="run one backend only")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mp-ledger-bench-") as tmp:
        if args.only != "postgres":
            results["SQLite"] = asyncio.run(bench(f"sqlite://{tmp}/ledger.db", args.records))
        if args.only != "sqlite":
            pg = PostgresServer().start()
            try:
                results["PostgreSQL"] = asyncio.run(bench(pg.new_database(), args.records))
            finally:
                pg.cleanup()
    names = ["load_s", *(q for q, _ in QUERIES)]
    print(f"\n{args.records:,} records over one month (200 users x 2 keys, 6 models); median of 5, seconds\n")
    print("| query | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        label = "load (batch writes, aggregates included)" if name == "load_s" else f"/admin/usage: {name}"
        print(f"| {label} | " + " | ".join(f"{r[name]:.3f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
