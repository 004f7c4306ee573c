"""Redis clients: WireRedis (store/wire.py) for the hot path on one node, redis-py for the rest
and for clusters. Nothing here retries a command that may have committed."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from meterproxy.store.wire import WireRedis

__all__ = ["make_redis_client", "make_redispy_client"]


def make_redis_client(url: str, timeout_s: float = 0.25,
                      max_connections: int = 64) -> WireRedis | RedisCluster:
    """The hot-path client: WireRedis (one pipelined connection) for `redis://`, `rediss://` and
    `unix://`; redis-py's RedisCluster for `redis+cluster://host:port`.

    `timeout_s` bounds every command (and connecting); nothing is retried, because a retried
    script may already have committed. `max_connections` only applies to the cluster client.
    """
    if url.startswith("redis+cluster://"):
        return _cluster_client(url, timeout_s, max_connections)
    return WireRedis(url, timeout_s)


def make_redispy_client(url: str, timeout_s: float = 0.25, max_connections: int = 64, *,
                        retries: int = 0) -> Redis | RedisCluster:
    """A redis-py client (what the ledger reads through, and what the hot path used before).

    Short socket timeouts so a dead store fails fast; no retries unless asked, because a retried
    script may already have committed (reads may retry: after a Redis restart, the first command
    on each pooled connection fails, and a retry dials a new one); a bounded pool that waits
    briefly for a free connection.
    """
    if url.startswith("redis+cluster://"):
        return _cluster_client(url, timeout_s, max_connections, retries)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=max(1.0, 4 * timeout_s),
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        health_check_interval=30, retry=Retry(NoBackoff(), retries),
    )
    return Redis.from_pool(pool)


def _cluster_client(url: str, timeout_s: float, max_connections: int,
                    retries: int = 0) -> RedisCluster:
    return RedisCluster.from_url(
        "redis://" + url.removeprefix("redis+cluster://"),
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        health_check_interval=30, retry=Retry(NoBackoff(), retries),
        max_connections=max_connections,
    )
