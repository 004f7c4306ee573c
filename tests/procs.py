"""Real processes on ephemeral loopback ports, for the tests and the benchmark (bench/services.py).

Tests use real servers, never fakes: a redis-server started here on a free port (and stopped), and
`meterproxy serve` / `meterproxy simulate` as subprocesses reached over sockets (`Proc`). The
benchmark's `Service` runs each under `taskset` on the cores it is given, in its own session, and
reads CPU and RSS over its whole process tree (uvicorn's supervisor and workers; nginx's master
and worker).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port(below: int = 65536) -> int:
    """An ephemeral loopback port that was free a moment ago (and < `below`)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts on 127.0.0.1:port, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A real redis-server on an ephemeral loopback port, in its own temp dir."""

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        # Cluster nodes also listen on port + 10000 (the bus), which must be a valid port.
        self.port = port or free_port(55000 if any("cluster" in e for e in extra) else 65536)
        self.dir = tempfile.mkdtemp(prefix="mp-redis-")
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed: run `make test`, which installs it")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Proc:
    """A `meterproxy` subcommand run as a real process; output captured to a file."""

    def __init__(self, args: Sequence[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix="mp-proc-", suffix=".log", delete=False)  # noqa: SIM115 (lives as long as the process)
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meterproxy", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
        )

    def wait_ready(self, timeout: float = 20.0) -> Proc:
        try:
            wait_port(self.port, timeout, self.proc)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- log ---\n{self.output()}") from exc
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def simulator(*extra: str) -> Iterator[Proc]:
    """`meterproxy simulate` on a free port."""
    port = free_port()
    p = Proc(["simulate", "--port", str(port), *extra], port).wait_ready()
    try:
        yield p
    finally:
        p.stop()


def _pg_bin(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        if not found:
            raise RuntimeError("PostgreSQL not installed: run `make test`, which installs it")
        exe = str(found[-1])
    return exe


class PostgresServer:
    """A real PostgreSQL on an ephemeral loopback port: initdb into a temp dir, pg_ctl start/stop.
    PostgreSQL refuses to run as root, so as root (CI) every command runs as the `postgres` user
    (created by Debian's package) through runuser, and the data dir is handed to that user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mp-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "pg.log")
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self._as, _pg_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self._n = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        # fsync=off only skips flushing the OS cache, which a crash of PostgreSQL (stop -m immediate)
        # keeps; synchronous_commit stays on: a commit it acknowledged must survive that crash.
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200")
        subprocess.run([*self._as, _pg_bin("pg_ctl"), "-D", self.data, "-l", self.log, "-o", opts,
                        "-w", "-t", "30", "start"], check=True, stdout=subprocess.DEVNULL)
        return self

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self._as, _pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        subprocess.run([*self._as, _pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                        "postgres", "-q", "-c", f"CREATE DATABASE {name}"], check=True,
                       stdout=subprocess.DEVNULL)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
# --- benchmark services --------------------------------------------------------------------------

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
        try:
            wait_port(self.port, timeout, self.proc)
        except RuntimeError as exc:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log else ""
            raise RuntimeError(f"{self.name}: {exc}\n{tail}") from exc
        return self

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
