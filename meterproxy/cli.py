"""meterproxy: a usage-metering, rate-limiting reverse proxy for LLM providers.

Reference: docs/configuration.md (config file), docs/api.md (HTTP API), docs/metrics.md,
docs/operations.md (stores, logs, upgrades, alerts). Every command exits 0 on success, 1 when
something failed (one line on stderr saying what and what to do) and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import shutil
import socket
import sys
import tempfile
from typing import Any

from meterproxy import ledger_cli, logs, usage_cli
from meterproxy.auth import key_hash
from meterproxy.clierror import CliError
from meterproxy.config import Config, ConfigError, load_config, summary


def ensure_port_free(host: str, port: int, option: str) -> None:
    """Fail with one line now, before anything is reported as running, if `host:port` is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise CliError(f"port {port} on {host} {reason}; stop what holds it or choose "
                           f"another with {option}") from None


def _serve(args: argparse.Namespace) -> int:
    from meterproxy import server

    cfg = load_or_report(args.config)
    if cfg is None:
        return 1
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    workers = max(args.workers, 1)
    ensure_port_free(host, port, "--port (or server.port)")
    logs.setup(cfg.server.log_format)  # the same in every worker: app_from_env
    logs.startup(cfg, host, port, workers)
    common: dict[str, Any] = dict(
        host=host, port=port, loop="uvloop", lifespan="on",
        access_log=False, log_level="warning", server_header=False, date_header=False,
        log_config=None,  # uvicorn's own lines go through meterproxy's handler (text or json), not its formatter
        proxy_headers=False,  # x-forwarded-* from clients is never trusted (issue #7)
        timeout_graceful_shutdown=cfg.server.shutdown_grace_s,
        backlog=4096,
    )
    if workers == 1:
        from meterproxy.app import MeterProxy

        _graceful_exit_is_success()
        server.run(MeterProxy(cfg, args.config), cfg, **common)
        return 0
    # Several workers: one /metrics for all of them through prometheus-client's multiprocess mode.
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    owned = mp_dir is None
    if owned:
        mp_dir = tempfile.mkdtemp(prefix="meterproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    os.environ["METERPROXY_CONFIG"] = os.path.abspath(args.config)
    try:
        _run_workers(server.server_config("meterproxy.app:app_from_env", cfg, factory=True, workers=workers,
                                          **common))
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

    ensure_port_free(args.host, args.port, "--port")
    simulator.run(args.host, args.port, chunk_delay_ms=args.chunk_delay_ms)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="meterproxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the proxy", formatter_class=fmt,
                       description="Run the proxy. Logs one startup line, then one access line per "
                                   "request (docs/operations.md). SIGHUP reloads the config; SIGTERM "
                                   "drains and exits 0.")
    s.add_argument("--config", required=True, metavar="FILE", help="the YAML config (docs/configuration.md)")
    s.add_argument("--host", help="listen address (default: server.host of the config)")
    s.add_argument("--port", type=int, help="listen port (default: server.port of the config)")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port; >1 aggregates /metrics across them")
    s.set_defaults(fn=_serve)
    c = sub.add_parser("check-config", help="validate a config file", formatter_class=fmt,
                       description="Validate a config file and print a summary, or every error as "
                                   "`path.to.field: message` (all of them, in one pass) and exit 1.")
    c.add_argument("file", help="the YAML config to validate; ${NAME} variables come from the environment")
    c.set_defaults(fn=_check)
    k = sub.add_parser("new-key", help="print a new client key and its config line", formatter_class=fmt,
                       description="Print a fresh random key and the `keys:` line (its sha256) to paste "
                                   "into the config. The key itself is shown once and stored nowhere.")
    k.add_argument("--id", required=True, help="the key's id: shown in metrics, logs and the ledger")
    k.add_argument("--user", help="the user the key belongs to (default: the id)")
    k.set_defaults(fn=_new_key)
    m = sub.add_parser("simulate", help="run the local simulated provider", formatter_class=fmt,
                       description="A local simulated provider for every flavor (deterministic usage), "
                                   "for demos, tests and benchmarks. Not a real model.")
    m.add_argument("--port", type=int, default=9000, help="listen port")
    m.add_argument("--host", default="127.0.0.1", help="listen address")
    m.add_argument("--chunk-delay-ms", type=float, default=0.0,
                   help="pause between streamed chunks, in milliseconds")
    m.set_defaults(fn=_simulate)
    usage_cli.register(sub)    # usage, usage export
    ledger_cli.register(sub)   # ledger migrate
    return p


def _one_line(exc: BaseException) -> str:
    """What went wrong and what to do, for the failures a user can meet; else the exception's text."""
    if isinstance(exc, ConfigError):
        return "; ".join(exc.errors) + " (run `meterproxy check-config FILE` for every error)"
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file; check the path"
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied; check the file's owner and mode"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no details'} (METERPROXY_DEBUG=1 shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure is one line on stderr and exit 1 (2: bad arguments), never a
    traceback unless METERPROXY_DEBUG=1."""
    args = build_parser().parse_args(argv)   # bad arguments: argparse prints usage and exits 2
    try:
        rc: int = args.fn(args)
        return rc
    except CliError as exc:
        print(f"meterproxy {args.cmd}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("METERPROXY_DEBUG"):
            raise
        print(f"meterproxy {args.cmd}: {_one_line(exc)}", file=sys.stderr)
        return 1
