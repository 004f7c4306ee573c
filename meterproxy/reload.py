"""Config reload on SIGHUP and on file change: validate, then swap atomically.

An invalid file is rejected with every error logged and the running config kept. Requests take one
snapshot of the config when they start, so in-flight requests finish under the rules they began
with. The `store` and `ledger` sections and the listener are fixed for the life of the process: a
changed `store` is logged, and all of them take effect on restart (docs/configuration.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from meterproxy.config import ConfigError, load_config
from meterproxy.state import AppState

log = logging.getLogger("meterproxy")


class Reloader:
    def __init__(self, state: AppState, path: str, poll_s: float = 1.0) -> None:
        self.state = state
        self.path = Path(path)
        self.poll_s = poll_s
        self._stamp = self._file_stamp()
        self._task: asyncio.Task[None] | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, reason: str) -> bool:
        """Load and swap; True when the new config is in force."""
        metrics = self.state.metrics
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            metrics.config_reloads.labels("error").inc()
            log.error("config reload (%s) rejected, keeping the running config:\n  %s",
                      reason, "\n  ".join(exc.errors))
            return False
        old = self.state.config
        if new.store != old.store:
            log.warning("config reload: store settings changed; they take effect on restart")
        self.state.config = new
        metrics.config_reloads.labels("ok").inc()
        log.info("config reloaded (%s): %d keys, %d providers", reason, len(new.raw.keys),
                 len(new.raw.providers))
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                self.reload("file changed")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self._task = loop.create_task(self._watch())

    def _on_hup(self) -> None:
        self._stamp = self._file_stamp()
        self.reload("SIGHUP")

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
