"""The asyncio Redis client every part of a run uses."""

from __future__ import annotations


def async_client(url: str, password: str | None, max_connections: int = 32, retry_for_s: float = 60.0):
    """An asyncio client that waits for a free connection instead of failing past its pool size,
    and rides out a Redis restart by retrying with backoff for about ``retry_for_s``."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=max(1, int(retry_for_s / 2)))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, password=password, max_connections=max_connections, timeout=60, retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError],
    )
    return aioredis.Redis(connection_pool=pool)
