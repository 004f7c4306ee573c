"""Sampling profiles of a running proxy with py-spy, summarised for the results and the docs.

py-spy samples the Python stacks of a live process from outside (no instrumentation, so the
profiled process runs at full speed between samples). Without `--native`, time spent in C
extensions is charged to the Python frame that called into them; in particular the self time of
`Runner.run` (asyncio/runners.py) is uvloop's C event loop: epoll, socket reads and writes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LOCATION = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

# Inclusive time of these frames answers "where does a request's time go" stage by stage.
STAGES = {
    "uvicorn: HTTP parsing, ASGI task start (HttpToolsProtocol.data_received)":
        "HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py)",
    "uvicorn: response writes (RequestResponseCycle.send)":
        "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py)",
    "prepare: route, auth, body, JSON, admission (request.prepare)": "prepare (meterproxy/request.py)",
    "  admission (request.admit)": "admit (meterproxy/request.py)",
    "upstream request until headers (transport Client.request)": "Client.request (meterproxy/transport/pool.py)",
    "upstream response bytes in (transport Connection.data_received)":
        "Connection.data_received (meterproxy/transport/connection.py)",
    "non-stream answer: read, parse usage, send (ProxyRoute._whole)": "ProxyRoute._whole (meterproxy/forward.py)",
    "stream pass-through loop (ProxyRoute._stream)": "ProxyRoute._stream (meterproxy/forward.py)",
    "  StreamScanner.feed": "StreamScanner.feed (meterproxy/metering/scan.py)",
    "settlement before the last byte (finish.settle)": "settle (meterproxy/finish.py)",
    "metering after the response (finish._finish)": "_finish (meterproxy/finish.py)",
    "ledger writer (background)": "Writer._run (meterproxy/ledger/writer.py)",
    "prometheus_client calls": "prometheus_client",
}


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def record(pid: int, seconds: float, out: Path, cores: str, rate: int = 100) -> str | None:
    """Sample `pid` for `seconds` into a folded-stacks file; an error message, or None on success.

    py-spy pauses the process for each sample (its default): without that (`--nonblocking`) stacks
    come out torn and whole functions get misattributed (measured here: a 3 µs helper showed as
    2.3% of a stream profile, 0.0% when paused). 100 Hz keeps the pauses cheap; set
    BENCH_PYSPY_NONBLOCKING=1 to sample without pausing anyway.
    """
    exe = py_spy()
    if exe is None:
        return "py-spy not installed"
    argv = ["taskset", "-c", cores, exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))),
            "-r", str(rate), "-f", "raw", "-o", str(out),
            *(["--nonblocking"] if os.environ.get("BENCH_PYSPY_NONBLOCKING") else [])]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    text, _ = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        return f"py-spy failed ({proc.returncode}): {text.decode(errors='replace')[-400:]}"
    return None


def _short(path: str) -> str:
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    return re.sub(r".*/(meterproxy|bench)/", r"\1/", path)


def _frame(raw: str) -> tuple[str, str]:
    """(label "func (short/file.py)", package) of one py-spy frame."""
    m = _LOCATION.match(raw)
    if not m:
        return raw, raw
    f = _short(m.group("file"))
    label = f"{m.group('func')} ({f})"
    top = f.split("/")[0]
    if top == "meterproxy":
        pkg = f.removesuffix(".py")
    elif top == "asyncio" and m.group("func") == "Runner.run":
        pkg = "uvloop event loop (C: epoll, socket I/O)"
    elif f.endswith(".py") and "/" not in f:
        pkg = "stdlib"
    else:
        pkg = top
    return label, pkg


# Leaves that mean "this thread is waiting", which py-spy's idle detection misses in some VMs:
# the default executor's idle threads (asyncio.to_thread) would otherwise dominate the profile, and
# the log listener thread (meterproxy/logs.py) waits in SimpleQueue.get, C code charged to `dequeue`
# (28 % of a non-stream profile at log level WARNING, where it has nothing to do).
_IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)", "wait (threading.py)", "get (queue.py)",
                "QueueListener.dequeue (logging/handlers.py)")


def summarise(folded: Path, top: int = 15) -> dict[str, Any]:
    """Self time by package and by function, and inclusive time of the STAGES, in % of the
    samples of running (not idle) threads."""
    total = 0
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not stack or not n_s.isdigit():
            continue
        n = int(n_s)
        frames = [_frame(f) for f in stack.split(";")]
        label, pkg = frames[-1]
        if label in _IDLE_LEAVES:
            continue
        total += n
        self_fn[label] += n
        self_pkg[pkg] += n
        seen = set()
        for lab, p in frames:
            seen.add(lab)
            seen.add(p)
        for key in seen:
            incl[key] += n
    if not total:
        return {"samples": 0}

    def share(c: Counter[str], k: int) -> list[list[Any]]:
        return [[name, round(100 * v / total, 1)] for name, v in c.most_common(k)]

    stages = [[title, round(100 * incl.get(frame, 0) / total, 1)] for title, frame in STAGES.items()]
    return {"samples": total, "self_by_package": share(self_pkg, 12), "self_by_function": share(self_fn, top),
            "stages_inclusive": stages}
