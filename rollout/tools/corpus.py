"""The offline tool backend: BM25 search and exact page lookup over an in-memory document set.

It is the local default (demo world, or a user's JSONL corpus), so a run needs no network.
Search and extraction share one tokenizer (rollout.tools.passages.tokenize).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from rank_bm25 import BM25Plus

from rollout.bounded_json import jsonl_rows
from rollout.tools.base import Page, SearchHit, ToolError
from rollout.tools.passages import tokenize


class CorpusError(ValueError):
    """A corpus file that cannot be used as is; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Document:
    url: str
    title: str
    text: str


def normalize_url(url: str) -> str:
    """The lookup key of a URL: http and https alike, host case-insensitive, no trailing slash.

    A URL without a scheme ("atlas.example/wiki/X") is read as https, since models often drop it.
    """
    raw = url.strip()
    if "://" not in raw:
        raw = "https://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme == "http":
        scheme = "https"
    path = parts.path.rstrip("/")
    key = urlunsplit((scheme, parts.netloc.lower(), path, parts.query, parts.fragment))
    return key.rstrip("/")


def make_snippet(text: str, max_chars: int) -> str:
    """The start of `text` on one line, cut at a word boundary, with "..." when cut."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[:max_chars]
    if not flat[max_chars].isspace() and " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip() + "..."


class CorpusBackend:
    """ToolBackend over a fixed list of documents: BM25 over title + text, fetch by URL."""

    def __init__(self, documents: Sequence[Document], snippet_chars: int = 90):
        if not documents:
            raise ValueError("CorpusBackend needs at least one document; the corpus given is empty")
        if snippet_chars < 1:
            raise ValueError(f"snippet_chars must be >= 1, got {snippet_chars}")
        self.documents = list(documents)
        self._by_url: dict[str, int] = {}
        for i, doc in enumerate(self.documents):
            key = normalize_url(doc.url)
            if key in self._by_url:
                first = self.documents[self._by_url[key]].url
                raise ValueError(f"duplicate document URL {doc.url!r} (same page as {first!r}); keep one of them")
            self._by_url[key] = i
        self._snippets = [make_snippet(d.text, snippet_chars) for d in self.documents]
        # Our own tokens, so search matches query_url's passage ranking word for word. (rank_bm25
        # rather than bm25s: bm25s imports numba, whose llvmlite objects break vLLM's start-up scan.)
        # BM25+'s idf log((N+1)/n) stays positive for terms in most documents; delta=0 keeps
        # documents without any query term at score 0, so they are never returned.
        self._index = BM25Plus([tokenize(f"{d.title}\n{d.text}") for d in self.documents], delta=0.0)

    def __len__(self) -> int:
        return len(self.documents)

    def search_indices(self, query: str, top_k: int) -> list[int]:
        """Indices of the best-matching documents, best first; ties go to the earlier document."""
        if top_k < 1:
            return []
        tokens = tokenize(query)
        if not tokens:
            return []
        scores = np.asarray(self._index.get_scores(tokens), dtype=np.float64)
        matched = np.flatnonzero(scores > 0)
        if matched.size == 0:
            return []
        # lexsort's last key is primary: score descending, then document order.
        order = matched[np.lexsort((matched, -scores[matched]))]
        return order[:top_k].tolist()

    async def search(self, query: str, top_k: int) -> list[SearchHit]:
        return [
            SearchHit(title=self.documents[i].title, url=self.documents[i].url, snippet=self._snippets[i])
            for i in self.search_indices(query, top_k)
        ]

    async def fetch(self, url: str) -> Page:
        i = self._by_url.get(normalize_url(url))
        if i is None:
            raise ToolError(f"page not found: {url}")
        doc = self.documents[i]
        return Page(url=doc.url, title=doc.title, text=doc.text)

    async def close(self) -> None:
        return None


def _required_text(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f"{where}: field {field!r} is missing or empty; every row needs a non-empty string {field}")
    return value


def load_corpus_jsonl(path: str | Path) -> list[Document]:
    """Documents from a JSONL file of {"url", "title", "text"} rows; blank lines are skipped.

    `title` may be left out (it becomes ""); `url` and `text` are required, and URLs must be
    unique after normalisation (http/https, host case, trailing slash).
    """
    path = Path(path)
    documents: list[Document] = []
    seen: dict[str, int] = {}
    for n, where, row in jsonl_rows(path, error=CorpusError, example='{"url", "title", "text"}'):
        url = _required_text(row, "url", where).strip()
        text = _required_text(row, "text", where)
        title = row.get("title", "")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise CorpusError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        key = normalize_url(url)
        if key in seen:
            raise CorpusError(
                f"{where}: field 'url' {url!r} duplicates line {seen[key]}; each page must appear once"
            )
        seen[key] = n
        documents.append(Document(url=url, title=title.strip(), text=text))
    if not documents:
        raise CorpusError(f"{path}: no documents found; the file is empty (write one JSON object per line)")
    return documents
