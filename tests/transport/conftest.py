"""Fixtures of the transport tests: event loops, client factories, a self-signed certificate."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meterproxy.transport import Client

CLIENTS: dict[str, Callable[..., Client]] = {"h1": Client}


@pytest.fixture(params=list(CLIENTS))
def new_client(request: pytest.FixtureRequest) -> Callable[..., Client]:
    return CLIENTS[request.param]


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(asyncio.wait_for(coro, 20))
        else:
            asyncio.run(asyncio.wait_for(coro, 20))
    return runner


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "c.pem", d / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    yield crt, key
