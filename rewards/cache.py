"""Caches for the answers of remote services (judge verdicts, web searches and pages).

`RedisCache` keeps strings in Redis under a prefix, optionally expiring. `GuardedCache` is how a
client uses any cache: a cache that fails is logged and counted, never raised, because a cache
outage costs time or money, not correctness; the error's type is logged, not its text, which can
hold a Redis URL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)
V = TypeVar("V")


class Cache(Protocol[V]):
    async def get(self, key: str) -> V | None: ...

    async def set(self, key: str, value: V) -> None: ...


class RedisCache:
    """Strings under `{prefix}:{key}` on a redis.asyncio client, expiring after ttl_s (None: never)."""

    def __init__(self, client: Any, prefix: str, ttl_s: float | None = None):
        if not prefix:
            raise ValueError(
                "a Redis cache needs a key prefix (e.g. the run's namespace) so that runs do not share keys"
            )
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s}")
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def redis_key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def get(self, key: str) -> str | None:
        value = await self.client.get(self.redis_key(key))
        if value is None:
            return None
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    async def set(self, key: str, value: str) -> None:
        px = None if self.ttl_s is None else max(1, int(self.ttl_s * 1000))
        await self.client.set(self.redis_key(key), value, px=px)


class GuardedCache(Generic[V]):
    """A cache (or none) whose failures become misses and skipped writes, each reported to `on_error`."""

    def __init__(self, cache: Cache[V] | None, what: str, on_miss: str, on_error: Callable[[], None] = lambda: None):
        self.cache = cache
        self.what = what  # "judge", "web tools": the log lines' subject
        self.on_miss = on_miss  # what the client does instead, for the log line
        self._on_error = on_error

    async def get(self, key: str) -> V | None:
        if self.cache is None:
            return None
        try:
            return await self.cache.get(key)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            self._on_error()
            log.warning("%s cache read failed (%s); %s", self.what, type(e).__name__, self.on_miss)
            return None

    async def set(self, key: str, value: V) -> None:
        if self.cache is None:
            return
        try:
            await self.cache.set(key, value)
        except Exception as e:  # noqa: BLE001
            self._on_error()
            log.warning("%s cache write failed (%s)", self.what, type(e).__name__)
