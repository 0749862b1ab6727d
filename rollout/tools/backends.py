"""The tool backend a ToolsConfig asks for: the offline corpus or the web."""

from __future__ import annotations

from rollout.tools.base import DelayedBackend
from rollout.tools.corpus import CorpusBackend


def tool_backend(tools, documents, redis: tuple[str, str | None, str] | None):
    """The ToolsConfig's backend: the offline corpus, or the web (with a Redis cache when there is Redis)."""
    if tools.backend == "web":
        from actors.redis_client import async_client
        from rollout.tools.web import RedisToolCache, WebBackend

        cache = None
        if redis is not None:
            url, password, namespace = redis
            cache = RedisToolCache(async_client(url, password), f"{namespace}:webtools", tools.web.cache_ttl_s)
        backend = WebBackend(tools.web, cache=cache)
    else:
        backend = CorpusBackend(documents, snippet_chars=tools.snippet_chars)
    return DelayedBackend(backend, tools.latency_s) if tools.latency_s > 0 else backend
