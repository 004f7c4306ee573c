"""The command line: one-line failures with exit 1/2 (never a traceback), --help describes every
option, check-config reports every error in one pass, policies/example.yaml validates as its
header says."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meterproxy.cli import build_parser
from meterproxy.config import ConfigError, parse_config
from tests.procs import ROOT, free_port

OK = "0" * 64


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterproxy", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60, env={**os.environ, **(env or {})})


def _one_line_failure(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("cmd", sorted(_subparsers()))
def test_every_option_has_help(cmd: str) -> None:
    parser = _subparsers()[cmd]
    assert parser.description, cmd
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 10, (cmd, action.dest)


def test_config_not_found(tmp_path: Path) -> None:
    for args in (["check-config", str(tmp_path / "nope.yaml")], ["serve", "--config", str(tmp_path / "nope.yaml")],
                 ["usage", "--config", str(tmp_path / "nope.yaml")]):
        _one_line_failure(_cli(*args), "nope.yaml", "No such file")


def test_usage_with_the_ledger_down(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    port = free_port()
    cfg.write_text('providers: {p: {base_url: "http://127.0.0.1:1", paths: ["/v1/"]}}\n'
                   f'ledger: {{url: "postgresql://mp:secret-pw@127.0.0.1:{port}/mp"}}\n')
    p = _cli("usage", "--config", str(cfg))
    _one_line_failure(p, f"127.0.0.1:{port}")
    assert "secret-pw" not in p.stderr


def test_port_in_use_fails_before_serving(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text('providers: {p: {base_url: "http://127.0.0.1:1", paths: ["/v1/"]}}\n')
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _one_line_failure(_cli("serve", "--config", str(cfg), "--port", str(port)),
                          f"port {port} on 127.0.0.1 is already in use", "--port")
        _one_line_failure(_cli("simulate", "--port", str(port)), f"port {port}", "already in use")


def test_bad_arguments_exit_2() -> None:
    p = _cli("serve")
    assert p.returncode == 2 and "--config" in p.stderr and "Traceback" not in p.stderr


def test_errors_in_one_pass_references_included() -> None:
    # A field error, an unknown plan on a user and on a key, and a missing variable whose field
    # must not get a knock-on "must be 64 hex characters" error.
    text = f"""
server: {{port: -1}}
admin: {{key_sha256: "${{ADMIN_SHA}}"}}
providers:
  p: {{base_url: "nope", paths: ["/v1/"]}}
plans: {{free: {{rpm: 5}}}}
users: {{alice: {{plan: gold}}}}
keys:
  - {{id: a, user: alice, sha256: "{OK}", plan: silver}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert info.value.errors == [
        "admin.key_sha256: environment variable ADMIN_SHA is not set",
        "server.port: Input should be greater than or equal to 0",
        "providers.p.base_url: must start with http:// or https://",
        "users.alice.plan: unknown plan 'gold'",
        "keys.0.plan: unknown plan 'silver'",
    ]


def test_example_config_validates_with_the_command_in_its_header() -> None:
    lines = (ROOT / "policies" / "example.yaml").read_text().splitlines()
    [cmd] = [ln.removeprefix("#").strip() for ln in lines[:10] if "meterproxy check-config" in ln]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("METERPROXY_ADMIN_KEY_SHA256", "OPENAI_API_KEY", "VENDORX_KEY", "RUNS_KEY"):
        env.pop(name, None)
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=60)
    assert p.returncode == 0 and "config OK: policies/example.yaml" in p.stdout, p.stderr
    bare = subprocess.run(["bash", "-c", cmd.rpartition(" meterproxy ")[1] + cmd.rpartition(" meterproxy ")[2]],
                          capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=60)
    assert bare.returncode == 1 and "environment variable OPENAI_API_KEY is not set" in bare.stderr
