"""`make demo` (scripts/demo.py): a taken port is one line and exit 1 before anything is printed as
running; on free ports the banner's commands work and say how to reach `meterproxy` from a shell."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.procs import ROOT, free_port

DEMO = [sys.executable, str(ROOT / "scripts" / "demo.py")]


def test_taken_port_fails_before_anything_runs() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        for args, var in ((["--port", str(taken), "--sim-port", str(free_port())], "PORT"),
                          (["--port", str(free_port()), "--sim-port", str(taken)], "SIM_PORT")):
            p = subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=60)
            assert p.returncode == 1 and p.stdout == "", (p.stdout, p.stderr)
            assert p.stderr.strip().splitlines() == [
                f"make demo: port {taken} is not available (Address already in use); "
                f"choose another: make demo {var}=<port>"]
        # Nothing was started on the other, free port.
        p = subprocess.run([*DEMO, "--check-ports", "--port", str(taken)], capture_output=True, text=True)
        assert p.returncode == 1


def test_demo_runs_on_chosen_ports(tmp_path: Path) -> None:
    port, sim_port = free_port(), free_port()
    out = tmp_path / "demo.out"
    with out.open("w") as f:
        proc = subprocess.Popen([*DEMO, "--port", str(port), "--sim-port", str(sim_port)], stdout=f,
                                stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops both." not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        banner = out.read_text()
        assert f"proxy http://127.0.0.1:{port}" in banner and f"simulator http://127.0.0.1:{sim_port}" in banner
        assert ". .venv/bin/activate" in banner and "/meterproxy" in banner
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                       headers={"Authorization": "Bearer mp-demo-alice"},
                       json={"model": "gpt-5.4", "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGINT)   # what Ctrl-C does
        assert proc.wait(30) == 0
    for p in (port, sim_port):  # both processes are gone
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
