"""`meterproxy usage` (the ledger as a table) and `meterproxy usage export` (records to stdout),
both read from the ledger database named by the config (ledger.url; the default SQLite file
beside it). Errors are one line on stderr: exit 1 for a failure, 2 for bad arguments."""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson

from meterproxy.clierror import CliError

_COLS = ("requests", "prompt_tokens", "cached_prompt_tokens", "cache_write_tokens",
         "completion_tokens", "reasoning_tokens", "cost_usd")
PAGE = 1000


def register(sub: Any) -> None:
    """Add `usage` and `usage export` to the CLI's subparsers."""
    u = sub.add_parser("usage", help="print the usage ledger as a table (from the ledger database)",
                       description="The usage ledger as a table, read from the ledger database of "
                                   "--config (docs/api.md: GET /admin/usage has the same filters). "
                                   "`meterproxy usage export` writes the records themselves.")
    u.add_argument("--config", help="config file naming the ledger (ledger.url); required")
    u.add_argument("--user", help="only this user")
    u.add_argument("--key", help="only this key id")
    u.add_argument("--team", help="only this team")
    u.add_argument("--model", help="only this model")
    u.add_argument("--provider", help="only this provider")
    u.add_argument("--since", help="start, inclusive: ISO date or datetime (UTC unless an offset is given)")
    u.add_argument("--until", help="end: ISO datetime (exclusive) or date (that whole day included)")
    u.add_argument("--group-by", default="user,key,model",
                   help="comma-separated: user,key,team,model,provider,day (default user,key,model)")
    u.set_defaults(fn=_sync(run_usage))
    us = u.add_subparsers(dest="usage_cmd", required=False, metavar="{export}",
                          help="export: write the records themselves (jsonl or csv) to stdout")
    e = us.add_parser("export", help="write ledger records to stdout, oldest first, streamed")
    e.add_argument("--config", required=True, help="config file naming the ledger (ledger.url)")
    e.add_argument("--since", help="first record time, inclusive: ISO date or datetime")
    e.add_argument("--until", help="end: ISO datetime (exclusive) or date (that whole day included)")
    e.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="jsonl: one record JSON per line (default); csv: a header, then one row each")
    e.set_defaults(fn=_sync(run_export))


def _sync(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            rc: int = asyncio.run(fn(args))
            return rc
        except BrokenPipeError:   # `| head`: the reader left; nothing to report
            return 0
    return run


@asynccontextmanager
async def open_ledger(config_path: str | None, migrate: bool = False) -> AsyncIterator[Any]:
    """(store, schema version) of a config's ledger, schema checked (or, with migrate, brought up
    to date)."""
    from meterproxy.config import ConfigError, load_config
    from meterproxy.ledger import SchemaTooNew, SchemaTooOld, open_ledger_store
    from meterproxy.store import StoreError
    from meterproxy.store.sql import redact, sqlite_path

    if not config_path:
        raise CliError("--config FILE is required", 2)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise CliError(f"{config_path}: " + "; ".join(exc.errors)) from exc
    url = cfg.ledger_url
    if not migrate and url.startswith("sqlite://") and not sqlite_path(url, cfg.config_dir).exists():
        raise CliError(f"no ledger at {sqlite_path(url, cfg.config_dir)} (nothing recorded yet)")
    store = open_ledger_store(url, cfg.config_dir)
    try:
        try:
            version = await store.migrate(auto=migrate)
        except (SchemaTooOld, SchemaTooNew) as exc:
            raise CliError(str(exc)) from exc
        yield store, version
    except StoreError as exc:
        raise CliError(f"ledger {redact(url)}: {exc}") from exc
    finally:
        await store.close()


async def run_usage(args: argparse.Namespace) -> int:
    from meterproxy.ledger.query import QueryError, parse_bound, run_query

    group_by = [g for g in args.group_by.split(",") if g]
    try:
        since, until = parse_bound(args.since, "since"), parse_bound(args.until, "until")
    except QueryError as exc:
        raise CliError(str(exc), 2) from exc
    async with open_ledger(args.config) as (store, _):
        try:
            result = await run_query(
                store, filters={"user": args.user, "key": args.key, "team": args.team,
                                "model": args.model, "provider": args.provider},
                since=since, until=until, group_by=group_by)
        except QueryError as exc:
            raise CliError(str(exc), 2) from exc
    print(format_table(result))
    return 0


async def run_export(args: argparse.Namespace) -> int:
    from meterproxy.ledger.query import QueryError, instant, parse_bound
    from meterproxy.ledger.record import record_json

    try:
        since, until = parse_bound(args.since, "since"), parse_bound(args.until, "until")
        start = None if since is None else instant(since, end=False)
        end = None if until is None else instant(until, end=True)
    except QueryError as exc:
        raise CliError(str(exc), 2) from exc
    out = sys.stdout
    writer: Any = None
    async with open_ledger(args.config) as (store, _):
        after = 0
        while True:   # keyset pages: memory stays one page whatever the range
            page = await store.records(after, PAGE, start, end)
            if not page:
                break
            for rid, rec in page:
                row = record_json(rid, rec)
                if args.format == "jsonl":
                    out.write(orjson.dumps(row).decode() + "\n")
                else:
                    if writer is None:
                        writer = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
                        writer.writeheader()
                    writer.writerow({**row, "tags": orjson.dumps(row["tags"]).decode()})
            out.flush()
            after = page[-1][0]
    return 0


def format_table(result: dict[str, Any]) -> str:
    """Rows and a total line, aligned."""
    group = list(result.get("group_by", []))
    header = [*group, *_COLS]
    rows = [[str(r.get(g, "")) for g in group] + [_fmt(r, c) for c in _COLS]
            for r in result.get("rows", [])]
    total = result.get("total", {})
    rows.append(["TOTAL"] + [""] * (len(group) - 1 if group else 0) + [_fmt(total, c) for c in _COLS])
    if not group:
        rows[-1] = ["TOTAL", *[_fmt(total, c) for c in _COLS]]
        header = ["", *_COLS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _fmt(row: dict[str, Any], col: str) -> str:
    v = row.get(col, 0)
    return f"{v:.6f}" if col == "cost_usd" else str(v)
