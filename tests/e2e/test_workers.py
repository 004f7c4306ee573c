"""`serve --workers N`: the supervisor forgets the live gauges of a worker that died
(metrics.mark_process_dead), so a dead worker's in-flight requests stop counting."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from tests.e2e.cluster import bearer, make_config, proxy, write_config
from tests.e2e.test_monitoring import scrape, total
from tests.procs import simulator


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_dead_workers_inflight_requests_stop_counting(tmp_path: Path) -> None:
    mp_dir = tmp_path / "prom-mp"
    mp_dir.mkdir()
    with simulator() as sim:
        path = write_config(tmp_path / "config.yaml", make_config(sim.port))
        with proxy(path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}) as px:
            def slow_stream() -> None:  # 60 s of events unless its worker dies first
                body = {"model": "gpt-5.4", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                headers = {**bearer("alice-1"), "x-sim-chunks": "600", "x-sim-chunk-delay-ms": "100"}
                try:
                    with httpx.stream("POST", f"{px.base}/v1/chat/completions", json=body, headers=headers,
                                      timeout=90) as r:
                        for _ in r.iter_bytes():
                            pass
                except httpx.HTTPError:
                    pass  # its worker was killed

            t = threading.Thread(target=slow_stream, daemon=True)
            t.start()

            def inflight() -> float:
                return total(scrape(px.base), "meterproxy_inflight_requests")

            wait_for(lambda: inflight() == 1, 15, "the stream is in flight")
            def worker_pids() -> set[int]:  # live ones; not multiprocessing's resource tracker
                pids = set()
                for c in psutil.Process(px.proc.pid).children():
                    with contextlib.suppress(psutil.Error):  # a dead worker not yet reaped
                        if "spawn_main" in " ".join(c.cmdline()):
                            pids.add(c.pid)
                return pids

            workers = worker_pids()
            assert len(workers) == 2
            for pid in workers:  # the stream's worker among them: killed without a chance to clean up
                os.kill(pid, signal.SIGKILL)
            # the supervisor replaces them (it checks every 0.5 s) and forgets their gauges
            wait_for(lambda: len(worker_pids() - workers) == 2, 20, "workers replaced")
            wait_for(lambda: inflight() == 0, 10, "a dead worker's in-flight request still counted")
            t.join(10)
