"""`meterproxy ledger migrate --config FILE`: bring the ledger schema up to date."""

from __future__ import annotations

import argparse
from typing import Any

from meterproxy.usage_cli import _sync, open_ledger


def register(sub: Any) -> None:
    """Add `ledger migrate` to the CLI's subparsers."""
    g = sub.add_parser("ledger", help="ledger database maintenance",
                       description="Ledger database maintenance: `meterproxy ledger migrate --config FILE` "
                                   "brings the schema up to date (docs/operations.md: upgrades).")
    gs = g.add_subparsers(dest="ledger_cmd", required=True, metavar="{migrate}",
                          help="migrate: bring the ledger schema up to date")
    m = gs.add_parser("migrate", help="upgrade the ledger schema to this version's (serve does it "
                                      "at start unless ledger.migrate: manual)")
    m.add_argument("--config", required=True, help="config file naming the ledger (ledger.url)")
    m.set_defaults(fn=_sync(run_migrate))


async def run_migrate(args: argparse.Namespace) -> int:
    async with open_ledger(args.config, migrate=True) as (store, version):
        print(f"ledger {store.url}: schema at version {version}")
    return 0
