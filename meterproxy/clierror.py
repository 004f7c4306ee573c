"""The one exception a command raises to fail: `meterproxy.cli.main` prints it as one line."""

from __future__ import annotations


class CliError(Exception):
    """A command failed: `str(self)` is the one line to print (what went wrong, what to do);
    `code` is the exit status (1: failed, 2: bad arguments)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
