"""The processes a benchmark run starts: simulator, proxies, bare pass-through, redis-server, nginx.

Each runs under `taskset` on the cores it is given, on an ephemeral loopback port, and is stopped
(by its own pid) when the run ends. `Service.cpu_s()` and `Service.rss()` read the whole process
tree (uvicorn's supervisor and its workers; nginx's master and worker).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cores: str, argv: Sequence[str]) -> list[str]:
    """argv run on `cores` ("0", "1", "0,1") with taskset."""
    return ["taskset", "-c", cores, *argv]


class Service:
    """One started server process (and its children)."""

    def __init__(self, name: str, argv: list[str], port: int, *, cores: str,
                 env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.name, self.port, self.cores = name, port, cores
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(pinned(cores, argv), stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=ROOT,
                                     start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> Service:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log else ""
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not listening on {self.port} after {timeout}s")

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        """user+sys CPU seconds of the process and its live children."""
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def sched_ns(self) -> tuple[int, int]:
        """(ns on a CPU, ns runnable but waiting for a CPU) over every thread of the tree, from
        /proc/<pid>/task/<tid>/schedstat: the wait shows when other processes crowd the core."""
        run = wait = 0
        for p in self.tree():
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{p.pid}/task").iterdir():
                    with contextlib.suppress(OSError, ValueError):
                        f = (task / "schedstat").read_text().split()
                        run += int(f[0])
                        wait += int(f[1])
        return run, wait

    def rss(self) -> int:
        """Resident set size in bytes, summed over the process tree."""
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the children if there are any, else the process."""
        kids = self.tree()[1:]
        return [p.pid for p in kids] or [self.proc.pid]

    def set_cores(self, cores: str) -> None:
        """Move the whole tree to other cores (for the --workers scaling comparison)."""
        cpus = {int(c) for c in cores.split(",")}
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.cpu_affinity(sorted(cpus))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._out is not subprocess.DEVNULL:
            self._out.close()  # type: ignore[union-attr]


def simulator(tmp: Path, cores: str) -> Service:
    port = free_port()
    return Service("simulator", [PY, "-m", "meterproxy", "simulate", "--port", str(port)], port,
                   cores=cores, log=tmp / "simulator.log")


def proxy(name: str, tmp: Path, config: Path, cores: str, workers: int = 1) -> Service:
    port = free_port()
    argv = [PY, "-m", "meterproxy", "serve", "--config", str(config), "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return Service(name, argv, port, cores=cores, log=tmp / f"{name}.log",
                   env={"METERPROXY_LOG_LEVEL": "WARNING"})


def bare(tmp: Path, upstream: str, cores: str) -> Service:
    port = free_port()
    return Service("bare", [PY, str(ROOT / "bench" / "bare.py"), "--port", str(port), "--upstream", upstream],
                   port, cores=cores, log=tmp / "bare.log")


def redis(tmp: Path, cores: str) -> Service:
    port = free_port()
    d = tmp / "redis"
    d.mkdir(exist_ok=True)
    exe = shutil.which("redis-server") or "redis-server"
    return Service("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d)], port, cores=cores,
                   log=tmp / "redis.log")


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
