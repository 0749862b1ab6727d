"""The tool backend interface: what a search engine and a page store must provide.

The local corpus (offline default) and web backends implement it; the Toolbox turns
model tool calls into calls on it and formats the results for the model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


class ToolError(Exception):
    """A failure the model should read about (page not found, search failed); never a crash."""


@dataclass(frozen=True)
class SearchHit:
    title: str
    url: str
    snippet: str


@dataclass(frozen=True)
class Page:
    url: str
    title: str
    text: str


class ToolBackend(Protocol):
    async def search(self, query: str, top_k: int) -> list[SearchHit]: ...

    async def fetch(self, url: str) -> Page: ...

    async def close(self) -> None: ...


class DelayedBackend:
    """Adds a fixed latency to every call of a backend: a web API's round trip, for benchmarks."""

    def __init__(self, backend: ToolBackend, latency_s: float):
        self.backend = backend
        self.latency_s = latency_s

    async def search(self, query: str, top_k: int) -> list[SearchHit]:
        await asyncio.sleep(self.latency_s)
        return await self.backend.search(query, top_k)

    async def fetch(self, url: str) -> Page:
        await asyncio.sleep(self.latency_s)
        return await self.backend.fetch(url)

    async def close(self) -> None:
        await self.backend.close()
