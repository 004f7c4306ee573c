"""The processes a benchmark run starts: simulator, proxies, bare pass-through, redis-server, nginx,
each a tests.procs.Service (pinned to cores, stopped by its own pid when the run ends)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.procs import ROOT, Service, free_port

PY = sys.executable


def simulator(tmp: Path, cores: str) -> Service:
    port = free_port()
    return Service("simulator", [PY, "-m", "meterproxy", "simulate", "--port", str(port)], port,
                   cores=cores, log=tmp / "simulator.log")


def proxy(name: str, tmp: Path, config: Path, cores: str, workers: int = 1, code: Path | None = None) -> Service:
    """`meterproxy serve`; with `code`, the package from that checkout (bench --baseline): -P keeps
    the working directory (this tree) off sys.path, and PYTHONPATH comes before the venv's editable
    install of this tree."""
    port = free_port()
    argv = [PY, *(["-P"] if code else []), "-m", "meterproxy", "serve", "--config", str(config), "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = {"METERPROXY_LOG_LEVEL": "WARNING", **({"PYTHONPATH": str(code)} if code else {})}
    return Service(name, argv, port, cores=cores, log=tmp / f"{name}.log", env=env)


def bare(tmp: Path, upstream: str, cores: str) -> Service:
    port = free_port()
    return Service("bare", [PY, str(ROOT / "bench" / "bare.py"), "--port", str(port), "--upstream", upstream],
                   port, cores=cores, log=tmp / "bare.log")


def redis(tmp: Path, cores: str, name: str = "redis") -> Service:
    port = free_port()
    d = tmp / name
    d.mkdir(exist_ok=True)
    exe = shutil.which("redis-server") or "redis-server"
    return Service(name, [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d)], port, cores=cores,
                   log=tmp / f"{name}.log")


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 1000000;
  upstream sim {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


def nginx(tmp: Path, upstream_port: int, cores: str) -> Service:
    """nginx as a plain reverse proxy (the floor: what forwarding alone costs), as this user."""
    port = free_port()
    d = tmp / "nginx"
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=d, upstream=upstream_port, port=port))
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    return Service("nginx", [exe, "-p", str(d), "-c", str(conf), "-e", str(d / "nginx-error.log")],
                   port, cores=cores, log=tmp / "nginx.log")
