"""Builds configs and starts simulator + proxy processes for end-to-end tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.procs import Proc, free_port, simulator

KEYS = {
    "alice-1": ("alice", "mp-test-alice-1"),
    "alice-2": ("alice", "mp-test-alice-2"),
    "bob-1": ("bob", "mp-test-bob-1"),
    "carol-1": ("carol", "mp-test-carol-1"),
}
ADMIN_KEY = "mp-test-admin"
PROVIDER_SECRETS = ("sim-secret-openai-123", "sim-secret-vendor-456", "sim-secret-runs-789")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_config(sim_port: int, *, store_url: str | None = None, on_error: str = "open",
                keys: dict[str, dict[str, Any]] | None = None, users: dict[str, Any] | None = None,
                plans: dict[str, Any] | None = None, server: dict[str, Any] | None = None,
                store: dict[str, Any] | None = None,
                ledger: dict[str, Any] | None = None) -> dict[str, Any]:
    base = f"http://127.0.0.1:{sim_port}"
    key_entries = []
    for key_id, (user, secret) in KEYS.items():
        entry: dict[str, Any] = {"id": key_id, "user": user, "sha256": sha(secret)}
        entry.update((keys or {}).get(key_id, {}))
        key_entries.append(entry)
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, **(server or {})},
        "store": {"on_error": on_error, **({"url": store_url} if store_url else {}), **(store or {})},
        **({"ledger": ledger} if ledger else {}),   # default: SQLite beside the config file
        "admin": {"key_sha256": sha(ADMIN_KEY)},
        "providers": {
            "sim": {"base_url": base, "paths": ["/v1/"],
                    "auth": {"header": "Authorization", "value": "Bearer ${SIM_OPENAI_KEY}"}},
            "vendor": {"base_url": base, "paths": ["/v4/beta/"],
                       "auth": {"header": "x-api-key", "value": "${SIM_VENDOR_KEY}"}},
            "runs": {"base_url": base, "paths": ["/v3/ai/"],
                     "auth": {"header": "Authorization", "value": "Bearer ${SIM_RUNS_KEY}"},
                     "stream_by_default": True,
                     "async_runs": {"poll_path": "/v3/ai/chat_completion_runs/{uid}"}},
        },
        "pricing": {
            "gpt-5.4": {"input": 1.25, "cached_input": 0.125, "output": 10.0},
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
            "openai/gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10.0},
            "o4-*": {"input": 1.1, "cached_input": 0.275, "output": 4.4},
            "text-embedding-3-small": {"input": 0.02, "output": 0},
        },
        "plans": plans or {},
        "users": users or {},
        "keys": key_entries,
    }
    return cfg


ENV = {"SIM_OPENAI_KEY": PROVIDER_SECRETS[0], "SIM_VENDOR_KEY": PROVIDER_SECRETS[1],
       "SIM_RUNS_KEY": PROVIDER_SECRETS[2]}


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextmanager
def proxy(config_path: Path, *, workers: int = 1, env: dict[str, str] | None = None,
          port: int | None = None) -> Iterator[Proc]:
    port = port or free_port()
    args = ["serve", "--config", str(config_path), "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    p = Proc(args, port, env={**ENV, "METERPROXY_LOG_LEVEL": "INFO", **(env or {})}).wait_ready()
    try:
        yield p
    finally:
        p.stop()


@contextmanager
def stack(tmp_path: Path, sim_args: tuple[str, ...] = (), **cfg_kw: Any) -> Iterator[tuple[Proc, Proc, Path]]:
    """Simulator + proxy in front of it; yields (sim, proxy, config_path)."""
    with simulator(*sim_args) as sim:
        path = write_config(tmp_path / "config.yaml", make_config(sim.port, **cfg_kw))
        with proxy(path) as px:
            yield sim, px, path


def bearer(key_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key_id][1]}"}
