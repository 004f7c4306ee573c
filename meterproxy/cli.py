"""Command line: serve, check-config, new-key, simulate, usage (SPEC.md "Commands")."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
from typing import Any

from meterproxy.auth import key_hash
from meterproxy.config import Config, ConfigError, load_config, summary


def setup_logging() -> None:
    """One log format for the supervisor and every worker (workers are fresh processes)."""
    logging.basicConfig(level=os.environ.get("METERPROXY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(process)d %(name)s %(message)s")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid config", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    workers = max(args.workers, 1)
    setup_logging()
    common: dict[str, Any] = dict(
        host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
        access_log=False, log_level="warning", server_header=False, date_header=False,
        proxy_headers=False,  # x-forwarded-* from clients is never trusted (issue #7)
        timeout_graceful_shutdown=cfg.server.shutdown_grace_s, timeout_keep_alive=75,
        backlog=4096,
    )
    if workers == 1:
        from meterproxy.app import MeterProxy

        _graceful_exit_is_success()
        uvicorn.run(MeterProxy(cfg, args.config), **common)
        return 0
    # Several workers: one /metrics for all of them through prometheus-client's multiprocess mode.
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    owned = mp_dir is None
    if owned:
        mp_dir = tempfile.mkdtemp(prefix="meterproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    os.environ["METERPROXY_CONFIG"] = os.path.abspath(args.config)
    try:
        _run_workers(uvicorn.Config("meterproxy.app:app_from_env", factory=True, workers=workers, **common))
    finally:
        if owned and mp_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)
    return 0


def _run_workers(config: Any) -> None:
    """uvicorn's supervisor, except that SIGHUP reloads the config in every worker (each validates
    it and keeps its running config when it is invalid) instead of restarting the workers, which
    would take the service down on an invalid file."""
    import signal

    from uvicorn.supervisors import Multiprocess

    class HupForwarding(Multiprocess):
        def handle_hup(self) -> None:
            for proc in self.processes:
                if proc.pid is not None:
                    os.kill(proc.pid, signal.SIGHUP)

        # A worker that exited (and was replaced) must stop counting in the live gauges
        # (inflight, backlog) that all workers' files add up to.
        def keep_subprocess_alive(self) -> None:
            before = [p.pid for p in self.processes]
            super().keep_subprocess_alive()
            _forget_replaced(before, [p.pid for p in self.processes])

        def restart_all(self) -> None:
            before = [p.pid for p in self.processes]
            super().restart_all()
            _forget_replaced(before, [p.pid for p in self.processes])

    sock = config.bind_socket()
    HupForwarding(config, sockets=[sock]).run()


def _forget_replaced(before: list[int | None], after: list[int | None]) -> None:
    from meterproxy.metrics import mark_process_dead

    for old, new in zip(before, after, strict=True):
        if old is not None and old != new:
            mark_process_dead(old)


def _graceful_exit_is_success() -> None:
    """Make `serve` exit 0 after a graceful SIGTERM / SIGINT shutdown.

    uvicorn restores the handlers it found and then re-raises the signal it handled; under the
    default dispositions that killed the process with -15 (SIGTERM) or a KeyboardInterrupt
    traceback (SIGINT) *after* a clean drain, so supervisors saw a crash (issue #7). Handlers that
    just return make uvicorn.run return normally. uvicorn replaces them with its own while serving.
    """
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)


def load_or_report(path: str) -> Config | None:
    """The config at `path`, or None after printing every error (one per line) to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    cfg = load_or_report(args.file)
    if cfg is None:
        return 1
    print(summary(cfg))
    return 0


def _new_key(args: argparse.Namespace) -> int:
    key = "mp-" + secrets.token_urlsafe(32)
    print(f"key:    {key}")
    print("config: (paste under keys:)")
    print(f'  - {{id: {args.id}, user: {args.user or args.id}, sha256: "{key_hash(key)}"}}')
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from meterproxy import simulator

    simulator.run(args.host, args.port, chunk_delay_ms=args.chunk_delay_ms)
    return 0


def _usage(args: argparse.Namespace) -> int:
    from meterproxy.usage_cli import run_usage

    return asyncio.run(run_usage(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meterproxy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", required=True)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(fn=_serve)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(fn=_check)
    k = sub.add_parser("new-key", help="print a new client key and its config line")
    k.add_argument("--id", required=True)
    k.add_argument("--user")
    k.set_defaults(fn=_new_key)
    m = sub.add_parser("simulate", help="run the local simulated provider")
    m.add_argument("--port", type=int, default=9000)
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--chunk-delay-ms", type=float, default=0.0)
    m.set_defaults(fn=_simulate)
    u = sub.add_parser("usage", help="print the usage ledger as a table")
    u.add_argument("--config", required=True)
    u.add_argument("--user")
    u.add_argument("--key")
    u.add_argument("--since")
    u.add_argument("--until")
    u.add_argument("--group-by", default="user,key,model")
    u.add_argument("--url", help="proxy URL, for the in-process store (default: from the config)")
    u.add_argument("--admin-key", default=os.environ.get("METERPROXY_ADMIN_KEY"),
                   help="admin key for --url (default: $METERPROXY_ADMIN_KEY)")
    u.set_defaults(fn=_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.fn(args)
    return rc
