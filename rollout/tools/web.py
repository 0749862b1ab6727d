"""The web tool backend: a Serper-style search API for search_urls, guarded page fetches for query_url.

Trust boundaries:
- The search endpoint is chosen by the operator in the config, not by the model, so it is called
  without the fetch guard (a self-hosted search proxy on localhost must work). Its API key is sent
  only there and never appears in a message for the model or in a log line.
- Page URLs come from the model. Every fetch and every redirect hop goes through
  rollout.tools.fetch_guard: http(s) only, no private/loopback/link-local/metadata addresses,
  connections pinned to the addresses that were checked. Redirects are followed here, by hand,
  so that each hop is checked; cookies are never kept, so one episode cannot leave state for another.

Content types (`PAGE_TYPES`): HTML and XHTML become text through html_text; text/plain,
text/markdown and application/json are returned as they are (JSON APIs such as Wikipedia's REST
pages are useful to a research agent and are already readable text). Everything else (PDF,
images, octet-stream, and a response with no Content-Type at all) is refused with a message
naming the type, since binary bytes would only waste the model's context.

Rate limits are per backend instance, that is per rollout worker: the cluster-wide rate is the
configured rate times the number of workers.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from rewards.cache import Cache, GuardedCache, RedisCache
from rewards.retry import KeyedRateLimiter
from rewards.secrets import read_secret
from rollout.tools.base import Page, SearchHit, ToolError
from rollout.tools.corpus import normalize_url
from rollout.tools.fetch_guard import FetchRefused, GuardedResolver, ParsedTarget, Resolver, check_url
from rollout.tools.html_text import html_to_text

log = logging.getLogger(__name__)
T = TypeVar("T")

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
PLAIN_TYPES = frozenset({"text/plain", "text/markdown", "application/json"})
PAGE_TYPES = HTML_TYPES | PLAIN_TYPES
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Transient server states worth one more try; other 4xx answers will not change on retry.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# html.parser is pure Python: parse big pages in a thread so the rollout loop keeps serving episodes.
THREAD_PARSE_BYTES = 256_000
MAX_RATE_BUCKETS = 4096  # hosts with a bucket of their own, per worker


class WebToolsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    search_url: str = Field("https://google.serper.dev/search", description="Serper-style POST endpoint")
    search_api_key_env: str | None = Field("SERPER_API_KEY", description="env var holding the search API key")
    search_api_key_file: Path | None = Field(None, description="file holding the key; wins over the env var")
    timeout_s: float = Field(15.0, gt=0, description="whole search call / whole fetch incl. redirects")
    connect_timeout_s: float = Field(5.0, gt=0)
    max_bytes: int = Field(3_000_000, ge=1024, description="larger responses are refused")
    max_redirects: int = Field(5, ge=0, le=20)
    allow_hosts: list[str] = Field(
        default_factory=list, description="exact hosts exempt from the address guard (never from its metadata check)"
    )
    allow_private: bool = Field(False, description="admit private/loopback/link-local (never metadata) addresses")
    user_agent: str = "Mozilla/5.0 (compatible; rapo-cluster/0.1; research agent)"
    search_rps: float | None = Field(5.0, gt=0, description="search requests per second per worker; None: no limit")
    per_host_rps: float | None = Field(2.0, gt=0, description="page requests per second per host per worker")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="lifetime of cached searches and pages")
    retry_backoff_s: float = Field(0.5, ge=0, description="pause before the one retry")

    @field_validator("allow_hosts")
    @classmethod
    def _no_metadata_hosts(cls, hosts: list[str]) -> list[str]:
        from rollout.tools.fetch_guard import is_metadata_host

        for host in hosts:
            if is_metadata_host(host):
                raise ValueError(f"{host!r} is a cloud metadata endpoint, which is never fetched; remove it")
        return hosts

    @field_validator("search_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("search_url must be an http:// or https:// URL")
        return v


# -- rate limiting -------------------------------------------------------------------------------


Sleep = Callable[[float], Awaitable[None]]


# -- caching -------------------------------------------------------------------------------------


ToolCache = Cache[str]


def cache_key(kind: str, *parts: object) -> str:
    """A fixed-length key for a tool result; the parts are JSON-encoded so that ("a b", 1) != ("a", "b 1")."""
    blob = json.dumps([kind, *parts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RedisToolCache(RedisCache):
    """Tool results (JSON text) under `{namespace}:{key}` in Redis; entries expire after ttl_s."""

    def __init__(self, client, namespace: str = "rapo:webtools", ttl_s: int = 7 * 24 * 3600):
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        super().__init__(client, namespace, ttl_s)


# -- pure helpers --------------------------------------------------------------------------------


def read_api_key(settings: WebToolsSettings, environ: dict[str, str] | None = None) -> str | None:
    """The search API key from the key file or env var; None when neither is configured (a keyless endpoint).
    Raises ValueError when a configured source gives no key."""
    return read_secret(
        "web search API key", file=settings.search_api_key_file, file_setting="search_api_key_file",
        env=settings.search_api_key_env, required=bool(settings.search_api_key_env),
        optional_hint="set search_api_key_env to null for a keyless endpoint", environ=environ,
    )


def parse_search_results(payload: object, top_k: int) -> list[SearchHit]:
    """SearchHits from a Serper-style reply {"organic": [{"title", "link", "snippet"}, ...]}."""
    if not isinstance(payload, dict):
        raise ToolError("search failed: the search service sent an unexpected reply")
    organic = payload.get("organic") or []
    if not isinstance(organic, list):
        raise ToolError("search failed: the search service sent an unexpected reply")
    hits: list[SearchHit] = []
    for item in organic:
        if not isinstance(item, dict):
            continue
        link = item.get("link")
        if not isinstance(link, str) or not link.strip():
            continue
        title = item.get("title") if isinstance(item.get("title"), str) else ""
        snippet = item.get("snippet") if isinstance(item.get("snippet"), str) else ""
        hits.append(SearchHit(title=" ".join(title.split()), url=link.strip(), snippet=" ".join(snippet.split())))
        if len(hits) >= top_k:
            break
    return hits


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def pick_charset(body: bytes, header_charset: str | None, is_html: bool) -> str:
    """The encoding to decode with: BOM, then the HTTP header, then <meta charset>, then UTF-8."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name
    candidates = [header_charset]
    if is_html:
        m = _META_CHARSET.search(body[:4096])
        candidates.append(m.group(1).decode("ascii") if m else None)
    for name in candidates:
        if not name:
            continue
        try:
            return codecs.lookup(name).name
        except LookupError:
            continue
    return "utf-8"


def page_from_body(url: str, mimetype: str, header_charset: str | None, body: bytes) -> Page:
    """A Page from a fetched body of an allowed content type (see PAGE_TYPES)."""
    is_html = mimetype in HTML_TYPES
    text = body.decode(pick_charset(body, header_charset, is_html), errors="replace")
    if is_html:
        title, text = html_to_text(text)
        return Page(url=url, title=title, text=text)
    return Page(url=url, title="", text=text.replace("\r\n", "\n").strip())


def page_to_json(page: Page) -> str:
    return json.dumps({"url": page.url, "title": page.title, "text": page.text}, ensure_ascii=False)


def page_from_json(blob: str) -> Page:
    d = json.loads(blob)
    return Page(url=str(d["url"]), title=str(d["title"]), text=str(d["text"]))


def hits_to_json(hits: Sequence[SearchHit]) -> str:
    return json.dumps([[h.title, h.url, h.snippet] for h in hits], ensure_ascii=False)


def hits_from_json(blob: str) -> list[SearchHit]:
    return [SearchHit(title=str(t), url=str(u), snippet=str(s)) for t, u, s in json.loads(blob)]


_HAS_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HOST_PORT = re.compile(r"^[^/:?#]+:\d+(?:[/?#]|$)")


def with_default_scheme(url: str) -> str:
    """Models often drop the scheme ("en.wikipedia.org/wiki/X"); read such a URL as https.

    A URL with another scheme ("file:", "javascript:") is left as it is, for the guard to refuse.
    """
    raw = url.strip()
    if _HAS_SCHEME.match(raw) and not _HOST_PORT.match(raw):
        return raw
    return "https://" + raw.lstrip("/")


# -- I/O -----------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth one retry (connection error, 5xx, 429); the message is safe to show."""


@dataclass(frozen=True)
class _Redirect:
    location: str


@dataclass
class _Budget:
    """Seconds left to one tool call, shared by its retry and its redirect hops."""

    left: float


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    """The body, refused once it exceeds max_bytes; the stream stops there, so huge bodies never land in memory."""
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise ToolError(f"{what} is too large ({resp.content_length} bytes; the limit is {max_bytes})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > max_bytes:
            raise ToolError(f"{what} is too large (more than {max_bytes} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class WebBackend:
    """ToolBackend over a search API and the open web; see the module docstring for the safety rules.

    `resolver` (host -> addresses) replaces system DNS for page fetches, for tests; `clock` and
    `sleep` drive the rate limiters and the retry pause.
    """

    def __init__(
        self,
        settings: WebToolsSettings,
        cache: ToolCache | None = None,
        resolver: Resolver | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ):
        self.settings = settings
        self.cache = cache
        self._cache = GuardedCache(cache, "web tools", "going to the network")
        self._resolver = resolver
        self._api_key = read_api_key(settings)
        self._allow_hosts = frozenset(settings.allow_hosts)
        self._sleep = sleep
        self._search_limit = KeyedRateLimiter(settings.search_rps, clock, sleep, MAX_RATE_BUCKETS)
        self._host_limit = KeyedRateLimiter(settings.per_host_rps, clock, sleep, MAX_RATE_BUCKETS)
        # Sessions bind to the running event loop, so they are made on first use, not here.
        self._search_session: aiohttp.ClientSession | None = None
        self._fetch_session: aiohttp.ClientSession | None = None

    # -- sessions ----------------------------------------------------------------------------------

    def _search_client(self) -> aiohttp.ClientSession:
        if self._search_session is None or self._search_session.closed:
            self._search_session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._search_session

    def _fetch_client(self) -> aiohttp.ClientSession:
        if self._fetch_session is None or self._fetch_session.closed:
            resolver = GuardedResolver(
                self._resolver, allow_hosts=self._allow_hosts, allow_private=self.settings.allow_private
            )
            # trust_env=False: an HTTP(S)_PROXY from the environment would connect on our behalf
            # to addresses the guard never saw.
            self._fetch_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver, limit=100),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={
                    "User-Agent": self.settings.user_agent,
                    "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,application/json;q=0.8,*/*;q=0.1",
                },
            )
        return self._fetch_session

    async def close(self) -> None:
        for session in (self._search_session, self._fetch_session):
            if session is not None and not session.closed:
                await session.close()
        self._search_session = self._fetch_session = None

    # -- cache -------------------------------------------------------------------------------------

    async def _from_cache(self, key: str, decode: Callable[[str], T], what: str) -> T | None:
        """A cached result, or None when there is none or it does not decode (then the network is asked)."""
        cached = await self._cache.get(key)
        if cached is None:
            return None
        try:
            return decode(cached)
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring an unreadable cached %s", what)
            return None

    async def _cache_set(self, key: str, value: str) -> None:
        await self._cache.set(key, value)

    # -- retry ---------------------------------------------------------------------------------------

    async def _twice(self, attempt: Callable[[], Awaitable[T]], limiter: KeyedRateLimiter, key: str, what: str) -> T:
        """Run `attempt` (rate-limited), once more after a short pause if it fails transiently."""
        await limiter.acquire(key)
        try:
            return await attempt()
        except _Transient as e:
            log.info("%s: %s; retrying once", what, e)
        await self._sleep(self.settings.retry_backoff_s)
        await limiter.acquire(key)
        try:
            return await attempt()
        except _Transient as e:
            raise ToolError(f"{what}: {e}") from None

    # -- search ----------------------------------------------------------------------------------

    async def search(self, query: str, top_k: int) -> list[SearchHit]:
        key = cache_key("search", query, top_k)
        hits = await self._from_cache(key, hits_from_json, "search result")
        if hits is not None:
            return hits
        budget = _Budget(self.settings.timeout_s)
        late = f"search failed: the search service did not answer within {self.settings.timeout_s:g}s"
        hits = await self._twice(
            lambda: self._within(budget, lambda: self._search_once(query, top_k), late),
            self._search_limit,
            "",
            "search failed",
        )
        await self._cache_set(key, hits_to_json(hits))
        return hits

    async def _search_once(self, query: str, top_k: int) -> list[SearchHit]:
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["X-API-KEY"] = self._api_key
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s)
        # Messages below never include the search URL or the response body: either may carry the key.
        try:
            async with self._search_client().post(
                self.settings.search_url, json={"q": query, "num": top_k}, headers=headers, timeout=timeout
            ) as resp:
                if resp.status in RETRY_STATUSES:
                    raise _Transient(f"the search service answered HTTP {resp.status}")
                if resp.status != 200:
                    log.warning("web search: the search service answered HTTP %s", resp.status)
                    raise ToolError(f"search failed: the search service answered HTTP {resp.status}")
                body = await _read_capped(resp, self.settings.max_bytes, "the search reply")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            if isinstance(e, TimeoutError):
                raise
            raise _Transient(f"could not reach the search service ({type(e).__name__})") from None
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ToolError("search failed: the search service sent a reply that is not valid JSON") from None
        return parse_search_results(payload, top_k)

    # -- fetch -----------------------------------------------------------------------------------

    async def fetch(self, url: str) -> Page:
        # The literal check runs before the cache, so no cached entry can serve a refused address.
        target = self._check(with_default_scheme(url))
        key = cache_key("fetch", normalize_url(str(target.url)))
        cached = await self._from_cache(key, page_from_json, "page")
        if cached is not None:
            return cached
        page = await self._fetch_uncached(target, url)
        await self._cache_set(key, page_to_json(page))
        return page

    def _check(self, url: str | URL) -> ParsedTarget:
        return check_url(url, allow_hosts=self._allow_hosts, allow_private=self.settings.allow_private)

    async def _fetch_uncached(self, target: ParsedTarget, asked: str) -> Page:
        budget = _Budget(self.settings.timeout_s)
        late = f"timed out after {self.settings.timeout_s:g}s fetching {asked}"
        for _hop in range(self.settings.max_redirects + 1):
            hop = target
            outcome = await self._twice(
                # the lambda runs (and is awaited) within this hop, while hop still is this hop
                lambda: self._within(budget, lambda: self._get_once(hop), late),  # noqa: B023
                self._host_limit,
                hop.host,
                f"fetching {hop.url} failed",
            )
            if isinstance(outcome, Page):
                return outcome
            try:
                nxt = hop.url.join(URL(outcome.location))
            except (ValueError, TypeError):
                raise ToolError(f"{hop.url} redirected to an invalid URL") from None
            try:
                target = self._check(nxt)
            except FetchRefused as e:
                raise FetchRefused(f"{hop.url} redirected to a refused URL; {e}") from None
        raise ToolError(f"too many redirects: {asked} redirected more than {self.settings.max_redirects} times")

    async def _within(self, budget: _Budget, make: Callable[[], Awaitable[T]], late: str) -> T:
        """Run one attempt inside what is left of a call's time budget, and charge the time it took.

        The budget covers all attempts and redirect hops of one tool call; rate-limit waits are
        outside it, so a busy host makes a call slower rather than making it time out.
        """
        if budget.left <= 0:
            raise ToolError(late)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(budget.left):
                return await make()
        except TimeoutError:
            raise ToolError(late) from None
        finally:
            budget.left -= time.monotonic() - t0

    async def _get_once(self, target: ParsedTarget) -> Page | _Redirect:
        url = str(target.url)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s)
        try:
            async with self._fetch_client().get(target.url, allow_redirects=False, timeout=timeout) as resp:
                if resp.status in REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise ToolError(f"{url} answered HTTP {resp.status} without a Location to follow")
                    return _Redirect(location)
                if resp.status in RETRY_STATUSES:
                    raise _Transient(f"the server answered HTTP {resp.status}")
                if not 200 <= resp.status < 300:
                    raise ToolError(f"{url} answered HTTP {resp.status}")
                mimetype = resp.content_type.lower() if resp.headers.get("Content-Type") else ""
                if mimetype not in PAGE_TYPES:
                    shown = mimetype or "no content type"
                    raise ToolError(f"cannot read {url}: {shown} is not supported (only HTML and plain-text pages)")
                body = await _read_capped(resp, self.settings.max_bytes, f"the page {url}")
                charset = resp.charset
                final = str(resp.url)
        except aiohttp.ClientSSLError as e:
            raise ToolError(f"could not fetch {url}: TLS error ({type(e).__name__})") from None
        except aiohttp.InvalidURL:
            raise ToolError(f"could not fetch {url}: invalid URL") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            if isinstance(e, TimeoutError):
                raise
            raise _Transient(f"connection failed ({type(e).__name__})") from None
        if len(body) > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(page_from_body, final, mimetype, charset, body)
        return page_from_body(final, mimetype, charset, body)
