"""`make demo [PORT=8080] [SIM_PORT=9000]`: start the simulator and the proxy on policies/demo.yaml,
print how to call it. Both ports are checked before anything starts, so a taken port is one line
and exit 1, never a banner pointing at somebody else's server."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_KEY = "mp-demo-alice"
ROOT = Path(__file__).resolve().parent.parent


def port_taken(port: int) -> str | None:
    """Why 127.0.0.1:port cannot be used, or None when it is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def wait(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"make demo: the {what} exited with status {proc.returncode} (see above)")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"make demo: the {what} is not listening on port {port} after 30 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8080, help="the proxy's port")
    ap.add_argument("--sim-port", type=int, default=9000, help="the simulated provider's port")
    ap.add_argument("--check-ports", action="store_true", help="only check that both ports are free")
    args = ap.parse_args()
    port, sim_port = args.port, args.sim_port
    if port == sim_port:
        print(f"make demo: PORT and SIM_PORT are both {port}; choose two ports", file=sys.stderr)
        return 1
    for p, var in ((port, "PORT"), (sim_port, "SIM_PORT")):
        why = port_taken(p)
        if why is not None:
            print(f"make demo: port {p} is not available ({why}); choose another: make demo {var}=<port>",
                  file=sys.stderr)
            return 1
    if args.check_ports:
        return 0
    # policies/demo.yaml points at the simulator on 9000: a copy points at SIM_PORT.
    cfg = tempfile.NamedTemporaryFile("w", prefix="meterproxy-demo-", suffix=".yaml", delete=False)  # noqa: SIM115
    cfg.write((ROOT / "policies" / "demo.yaml").read_text().replace("127.0.0.1:9000", f"127.0.0.1:{sim_port}"))
    cfg.close()
    exe = [sys.executable, "-m", "meterproxy"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([*exe, "simulate", "--port", str(sim_port), "--chunk-delay-ms", "30"]))
        wait(sim_port, procs[0], "simulator")
        procs.append(subprocess.Popen([*exe, "serve", "--config", cfg.name, "--port", str(port)]))
        wait(port, procs[1], "proxy")
        print(banner(port, sim_port), flush=True)
        procs[1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        os.unlink(cfg.name)
    return 0


def banner(port: int, sim_port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    venv = Path(sys.executable).parent
    return f"""
meterproxy demo is running: proxy {base}  →  simulator http://127.0.0.1:{sim_port}
demo key: {DEMO_KEY}   (admin key: mp-demo-admin)

  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"gpt-5.4","messages":[{{"role":"user","content":"Hello"}}]}}'

  {sys.executable} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{DEMO_KEY}")
for chunk in client.chat.completions.create(model="gpt-5.4", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

  curl -s {base}/v1/messages -H 'x-api-key: {DEMO_KEY}' -H 'anthropic-version: 2023-06-01' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{{"role":"user","content":"Hello"}}]}}'
  curl -s '{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse' \\
       -H 'x-goog-api-key: {DEMO_KEY}' -H 'Content-Type: application/json' \\
       -d '{{"contents":[{{"parts":[{{"text":"Hello"}}]}}]}}'

  curl -s {base}/usage -H 'Authorization: Bearer {DEMO_KEY}'
  curl -s '{base}/admin/usage?group_by=user,model' -H 'Authorization: Bearer mp-demo-admin'
  curl -s {base}/metrics | grep meterproxy_tokens_total
  {sys.executable} -m meterproxy usage --config policies/demo.yaml --group-by user,model

The ledger is .demo/ledger.db (SQLite): usage and monthly budgets survive a restart of the demo.

The `meterproxy` command is in the project's virtualenv: in another shell, from {ROOT},
  . {venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv}/activate    # then: meterproxy --help
or run it as {venv}/meterproxy. Reference: docs/ (configuration, API, metrics, operations).

Ctrl-C stops both."""


if __name__ == "__main__":
    sys.exit(main())
