"""`make demo`: start the simulator and the proxy on policies/demo.yaml, print how to call it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

DEMO_KEY = "mp-demo-alice"


def wait(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def main() -> None:
    exe = [sys.executable, "-m", "meterproxy"]
    sim = subprocess.Popen([*exe, "simulate", "--port", "9000", "--chunk-delay-ms", "30"])
    wait(9000)
    proxy = subprocess.Popen([*exe, "serve", "--config", "policies/demo.yaml"])
    wait(8080)
    print(f"""
meterproxy demo is running: proxy http://127.0.0.1:8080  →  simulator http://127.0.0.1:9000
demo key: {DEMO_KEY}   (admin key: mp-demo-admin)

  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"gpt-5.4","messages":[{{"role":"user","content":"Hello"}}]}}'

  {sys.executable} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="{DEMO_KEY}")
for chunk in client.chat.completions.create(model="gpt-5.4", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

  curl -s http://127.0.0.1:8080/usage -H 'Authorization: Bearer {DEMO_KEY}'
  curl -s 'http://127.0.0.1:8080/admin/usage?group_by=user,model' -H 'Authorization: Bearer mp-demo-admin'
  curl -s http://127.0.0.1:8080/metrics | grep meterproxy_tokens_total
  {sys.executable} -m meterproxy usage --config policies/demo.yaml --group-by user,model

The ledger is .demo/ledger.db (SQLite): usage and monthly budgets survive a restart of the demo.

Ctrl-C stops both.""", flush=True)
    try:
        proxy.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for p in (proxy, sim):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (proxy, sim):
            p.wait(10)
    os._exit(0)


if __name__ == "__main__":
    main()
