"""`meterproxy usage`: the ledger as a table, read from Redis directly or from a running proxy."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import httpx

from meterproxy.admin import parse_when
from meterproxy.errors import ProxyError

_COLS = ("requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
         "reasoning_tokens", "cost_usd")


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


async def run_usage(args: argparse.Namespace) -> int:
    from meterproxy.cli import load_or_report

    cfg = load_or_report(args.config)
    if cfg is None:
        return 1
    group_by = [g for g in args.group_by.split(",") if g]
    try:
        if cfg.store.url and not args.url:
            from meterproxy.ledger import Ledger, redis_store
            from meterproxy.limits.redis import make_redispy_client

            client = make_redispy_client(cfg.store.url, 5.0, retries=1)  # reads only
            ledger = Ledger(redis_store(client))
            try:
                result = await ledger.query(
                    user=args.user, key=args.key, model=None, provider=None,
                    since=parse_when(args.since, "since"),
                    until=parse_when(args.until, "until", end=True), group_by=group_by)
            finally:
                await client.aclose()
        else:
            url = args.url or f"http://{cfg.server.host}:{cfg.server.port}"
            if not args.admin_key:
                print("the in-process store lives in the proxy: pass --admin-key (or set "
                      "METERPROXY_ADMIN_KEY) to read it from the running proxy", file=sys.stderr)
                return 1
            params = {k: v for k, v in {"user": args.user, "key": args.key, "since": args.since,
                                        "until": args.until, "group_by": ",".join(group_by)}.items() if v}
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.get(f"{url}/admin/usage", params=params,
                                   headers={"Authorization": f"Bearer {args.admin_key}"})
            if r.status_code != 200:
                print(f"{url}: HTTP {r.status_code}: {r.text}", file=sys.stderr)
                return 1
            result = r.json()
    except ProxyError as err:
        print(err.message, file=sys.stderr)
        return 1
    print(format_table(result))
    return 0
