"""The tool backend interface: what a search engine and a page store must provide.

The local corpus (offline default) and web backends implement it; the Toolbox turns
model tool calls into calls on it and formats the results for the model.
"""

from __future__ import annotations

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
