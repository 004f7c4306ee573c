"""Shared fixtures: a real redis-server per session, flushed between tests; both stores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the session's real redis-server, emptied before each test."""
    import redis

    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.script_flush()
    client.close()
    yield redis_server.url


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Each test once per store: None for the in-process store, else the URL of the session's
    (flushed) redis-server."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url
