"""Config validation: one negative fixture per message, exact messages asserted; env; reload."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meterproxy.config import ConfigError, load_config, parse_config
from meterproxy.metrics import Metrics
from meterproxy.reload import Reloader

FIX = Path(__file__).parent / "fixtures" / "config"

EXPECTED = {
    "bad_ledger_url.yaml": ["ledger.url: must start with sqlite://, postgresql://, postgres://"],
    "bad_ledger_migrate.yaml": ["ledger.retention_days: Input should be greater than or equal to 1",
                                "ledger.migrate: Input should be 'auto' or 'manual'"],
    "bad_ledger_export.yaml": ["ledger.export.2.type: Input should be 'cloudevents'",
                               "ledger.export.2.url: must start with http:// or https://"],
    "bad_ledger_dup.yaml": ["ledger.export: exporter names must be unique (set `name`): cloudevents"],
    "bad_limits.yaml": ["plans.free.rpm: Input should be greater than or equal to 0",
                        "plans.free.tpm: Input should be a valid integer, unable to parse string as an integer"],
    "bad_client_limits.yaml": ["server.max_header_bytes: Input should be greater than or equal to 1024",
                               "server.max_headers: Input should be greater than or equal to 1",
                               "server.header_timeout_s: Input should be greater than 0",
                               "server.body_read_timeout_s: Input should be greater than 0",
                               "server.keep_alive_timeout_s: Input should be greater than 0",
                               "server.max_connections: Input should be greater than or equal to 1"],
    "bad_on_error.yaml": ["store.on_error: Input should be 'open' or 'closed'"],
    "bad_provider.yaml": ["providers.p.base_url: must start with http:// or https://",
                          "providers.p.paths: path prefix 'v1/' must start with /"],
    "bad_store_url.yaml": ["store.url: unsupported Redis URL option(s) ['socket_timeout']: supported are "
                           "['db', 'password', 'ssl_ca_certs', 'ssl_cert_reqs', 'ssl_certfile', "
                           "'ssl_check_hostname', 'ssl_keyfile', 'username'] (timeouts come from the store config)"],
    "bad_sha.yaml": ["keys.0.sha256: must be 64 lowercase hex characters (see `meterproxy new-key`)"],
    "dup_id.yaml": ["keys.1.id: duplicate key id 'k1' (also keys.0)"],
    "env_missing.yaml": ["providers.p.auth.value: environment variable MISSING_VAR is not set"],
    "no_providers.yaml": ["providers: Dictionary should have at least 1 item after validation, not 0"],
    "price_missing_output.yaml": ["pricing.gpt-x.output: Field required"],
    "unknown_field.yaml": ["server.colour: Extra inputs are not permitted"],
    "unknown_plan.yaml": ["keys.0.plan: unknown plan 'gold'"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_negative_fixture_messages(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FIX / name, env={})
    assert info.value.errors == EXPECTED[name]


def test_invalid_yaml_names_the_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FIX / "bad_yaml.yaml", env={})
    assert info.value.errors[0].startswith("<root>: invalid YAML")


def test_all_errors_reported_at_once() -> None:
    text = """
providers:
  p: {base_url: "nope", paths: ["/v1/"]}
keys:
  - {id: a, user: u, sha256: "x", plan: nope}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert len(info.value.errors) >= 2


def test_env_substitution_and_limits_merge() -> None:
    text = """
providers:
  p: {base_url: "http://h", paths: ["/v1/", "/v1/x/"], auth: {header: Authorization, value: "Bearer ${K}"}}
  q: {base_url: "http://q", paths: ["/v1/x/y/"]}
plans:
  free: {rpm: 20, tpm: 1000, monthly_usd: 5}
users:
  alice: {plan: free, limits: {rpm: 7}}
keys:
  - {id: k, user: alice, sha256: "%s", plan: free, limits: {rpm: 60}, models: ["gpt-*"]}
""" % ("a" * 64)
    cfg = parse_config(text, env={"K": "sekret"})
    p = cfg.principals["a" * 64]
    assert (p.limits.rpm, p.limits.tpm, p.limits.monthly_usd_nano) == (60, 1000, 5_000_000_000)
    assert (p.user_limits.rpm, p.user_limits.tpm) == (7, 1000)
    assert p.allows_model("gpt-5.4") and not p.allows_model("o3")
    assert cfg.route("/v1/x/y/z") is not None and cfg.route("/v1/x/y/z").name == "q"  # type: ignore[union-attr]
    assert cfg.route("/v1/chat").auth_value == b"Bearer sekret"  # type: ignore[union-attr]
    assert cfg.route("/v2/") is None


def test_repo_policies_are_valid() -> None:
    load_config("policies/demo.yaml", env={})
    load_config("policies/example.yaml", env={"OPENAI_API_KEY": "k", "VENDORX_KEY": "k", "RUNS_KEY": "k",
                                              "ANTHROPIC_API_KEY": "k", "GEMINI_API_KEY": "k",
                                              "METERPROXY_ADMIN_KEY_SHA256": "b" * 64})


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "meterproxy", "check-config", "policies/demo.yaml"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "config OK" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "meterproxy", "check-config", str(FIX / "dup_id.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "keys.1.id: duplicate key id 'k1' (also keys.0)" in bad.stderr


def test_new_key_cli_prints_matching_hash() -> None:
    import hashlib

    out = subprocess.run([sys.executable, "-m", "meterproxy", "new-key", "--id", "ci"],
                         capture_output=True, text=True, check=True).stdout
    key = out.split("key:")[1].split()[0]
    assert hashlib.sha256(key.encode()).hexdigest() in out and "id: ci" in out


async def test_reloader_swaps_valid_and_rejects_invalid(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text((FIX / "ok_minimal.yaml").read_text())
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    class Holder:
        config = load_config(path)

    state = Holder()
    state.metrics = metrics  # type: ignore[attr-defined]
    r = Reloader(state, str(path), poll_s=0.05)  # type: ignore[arg-type]
    r.start()
    try:
        first = state.config
        path.write_text((FIX / "ok_minimal.yaml").read_text() + "plans: {free: {rpm: 3}}\n")
        for _ in range(100):
            if state.config is not first:
                break
            await asyncio.sleep(0.02)
        assert state.config is not first and "free" in state.config.raw.plans
        good = state.config
        path.write_text((FIX / "dup_id.yaml").read_text())
        assert r.reload("test") is False
        assert state.config is good
        assert registry.get_sample_value("meterproxy_config_reloads_total", {"result": "ok"}) == 1
        assert registry.get_sample_value("meterproxy_config_reloads_total", {"result": "error"}) >= 1  # type: ignore[operator]
    finally:
        await r.stop()
