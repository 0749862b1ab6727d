"""WebBackend and LLMExtractor against local aiohttp servers on 127.0.0.1 (no outside network)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections import Counter
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from actors.redis_client import async_client
from rewards.retry import TokenBucket
from rollout.chat_format import ParsedCall
from rollout.tools.base import Page, SearchHit, ToolError
from rollout.tools.extractor import ExtractorSettings, LLMExtractor, clean_answer
from rollout.tools.fetch_guard import FetchRefused
from rollout.tools.toolbox import Toolbox
from rollout.tools.web import (
    RedisToolCache,
    WebBackend,
    WebToolsSettings,
    cache_key,
    page_from_body,
    parse_search_results,
    pick_charset,
    with_default_scheme,
)

KEY = "sk-test-9f8e7d6c5b4a-do-not-leak"
KEY_ENV = "RAPO_TEST_SEARCH_KEY"

PAGE_HTML = """<!doctype html><html><head><title>Velmora - Atlas</title>
<script>var secret = "script text";</script><style>p{}</style></head>
<body><h1>Velmora</h1><p>Velmora is a country in the north.</p><p>The capital of Velmora is Drennick.</p></body></html>"""  # noqa: E501


def run(coro):
    return asyncio.run(coro)


def fake_resolver(table: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    resolve.calls = calls
    return resolve


# Fake DNS for page fetches: public.test is allowed by name; the others stand for a rebinding or
# malicious domain that points at the cluster's network or the metadata service.
DNS = {
    "public.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],
    "localhost": ["127.0.0.1"],
    "internal.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "sneaky.test": ["127.0.0.1"],
}


def make_app(hits: Counter) -> web.Application:
    """One app as both a Serper-style search API and a small web site; `hits` counts requests by path."""
    state = {"flaky": 0}

    @web.middleware
    async def count(request, handler):
        hits[request.path] += 1
        return await handler(request)

    async def search(request: web.Request) -> web.Response:
        if request.headers.get("X-API-KEY") != KEY:
            return web.json_response({"message": "Unauthorized."}, status=403)
        body = await request.json()
        q, num = body["q"], body["num"]
        hits[f"q:{q}"] += 1
        if q == "broken json":
            return web.Response(text="{not json", content_type="application/json")
        if q == "always 500":
            return web.Response(status=500, text=f"internal error, key was {KEY}")
        if q == "flaky":
            state["flaky"] += 1
            if state["flaky"] == 1:
                return web.Response(status=503)
        if q == "slow":
            await asyncio.sleep(3)
        organic = [
            {
                "title": f" Result  {i} ",
                "link": f"https://site{i}.example/{q.replace(' ', '-')}",
                "snippet": f"snippet\n{i}",
                "position": i,
            }
            for i in range(num + 2)
        ]
        organic.insert(1, {"title": "no link here"})
        return web.json_response({"searchParameters": {"q": q}, "organic": organic})

    async def page(request):
        return web.Response(text=PAGE_HTML, content_type="text/html")

    async def latin1(request):
        body = "<html><head><title>Caf\xe9</title></head><body><p>cr\xe8me br\xfbl\xe9e</p></body></html>"
        return web.Response(body=body.encode("latin-1"), headers={"Content-Type": "text/html; charset=ISO-8859-1"})

    async def plain(request):
        return web.Response(text="line one\r\nline two\n", content_type="text/plain")

    async def big(request):
        return web.Response(text="<p>" + "x" * 10_000 + "</p>", content_type="text/html")

    async def big_chunked(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"<p>" + b"y" * 1000 + b"</p>")
        await resp.write_eof()
        return resp

    async def image(request):
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    async def pdf(request):
        return web.Response(body=b"%PDF-1.7", content_type="application/pdf")

    async def redirect(request):
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/redirect/{n - 1}" if n > 0 else "/page")

    async def relative(request):
        raise web.HTTPMovedPermanently("page")

    async def to(request):
        port = request.url.port
        where = {
            "localhost": f"http://localhost:{port}/secret",
            "internal": f"http://internal.test:{port}/secret",
            "metadata": f"http://metadata.test:{port}/secret",
            "decimal": f"http://2130706433:{port}/secret",
            "mapped": f"http://[::ffff:127.0.0.1]:{port}/secret",
            "file": "file:///etc/passwd",
            "public": f"http://public.test:{port}/page",
        }[request.match_info["where"]]
        raise web.HTTPFound(where)

    async def secret(request):
        return web.Response(text="internal admin data", content_type="text/plain")

    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(text="late", content_type="text/plain")

    async def flaky(request):
        state["flaky"] += 1
        if state["flaky"] == 1:
            return web.Response(status=502)
        return web.Response(text="second try works", content_type="text/plain")

    async def missing(request):
        return web.Response(status=404, text="nope")

    app = web.Application(middlewares=[count])
    app.router.add_post("/search", search)
    for path, handler in [
        ("/page", page),
        ("/latin1", latin1),
        ("/plain", plain),
        ("/big", big),
        ("/big-chunked", big_chunked),
        ("/image", image),
        ("/pdf", pdf),
        ("/redirect/{n}", redirect),
        ("/relative/x", relative),
        ("/to/{where}", to),
        ("/secret", secret),
        ("/slow", slow),
        ("/flaky", flaky),
        ("/missing", missing),
    ]:
        app.router.add_get(path, handler)
    app.router.add_get("/relative/page", page)
    return app


@asynccontextmanager
async def serve(app: web.Application):
    runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def web_settings(port: int, **overrides) -> WebToolsSettings:
    base = dict(
        search_url=f"http://127.0.0.1:{port}/search",
        search_api_key_env=KEY_ENV,
        allow_hosts=["127.0.0.1", "public.test"],
        timeout_s=5.0,
        connect_timeout_s=2.0,
        max_bytes=4096,
        max_redirects=3,
        search_rps=None,
        per_host_rps=None,
        retry_backoff_s=0.0,
    )
    base.update(overrides)
    return WebToolsSettings(**base)


async def with_backend(scenario, *, cache=None, resolver=None, clock=None, sleep=None, **overrides):
    """Start the local app, run scenario(backend, port, hits), close everything."""
    hits: Counter = Counter()
    async with serve(make_app(hits)) as port:
        extra = {k: v for k, v in {"clock": clock, "sleep": sleep}.items() if v is not None}
        backend = WebBackend(
            web_settings(port, **overrides), cache=cache, resolver=resolver or fake_resolver(DNS), **extra
        )
        try:
            return await scenario(backend, port, hits)
        finally:
            await backend.close()


# -- search --------------------------------------------------------------------------------------


def test_search_sends_the_key_and_maps_organic_results(api_key):
    async def scenario(backend, port, hits):
        return await backend.search("capital of velmora", 3)

    result = run(with_backend(scenario))
    assert result == [
        SearchHit("Result 0", "https://site0.example/capital-of-velmora", "snippet 0"),
        SearchHit("Result 1", "https://site1.example/capital-of-velmora", "snippet 1"),
        SearchHit("Result 2", "https://site2.example/capital-of-velmora", "snippet 2"),
    ]


def test_search_failures_become_short_tool_errors_without_the_key(api_key, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario(backend, port, hits):
        errors = []
        for q in ["broken json", "always 500"]:
            with pytest.raises(ToolError) as e:
                await backend.search(q, 3)
            errors.append(str(e.value))
        assert hits["q:always 500"] == 2  # one retry, then give up
        assert await backend.search("flaky", 2)  # 503 once, then fine
        assert hits["q:flaky"] == 2
        # A wrong key: the server says 403, the message says so and nothing more.
        backend._api_key = "sk-wrong-" + KEY
        with pytest.raises(ToolError) as e:
            await backend.search("anything", 3)
        errors.append(str(e.value))
        return errors

    errors = run(with_backend(scenario))
    assert "not valid JSON" in errors[0]
    assert "HTTP 500" in errors[1]
    assert "HTTP 403" in errors[2]
    for message in errors:
        assert KEY not in message and "127.0.0.1" not in message  # neither key nor search URL
    assert KEY not in caplog.text


def test_search_timeout_and_unreachable_service_are_tool_errors(api_key, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario(backend, port, hits):
        with pytest.raises(ToolError, match="did not answer within 0.5s") as slow:
            await backend.search("slow", 3)
        return str(slow.value)

    message = run(with_backend(scenario, timeout_s=0.5))
    assert KEY not in message

    async def unreachable():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        backend = WebBackend(web_settings(dead_port))
        try:
            with pytest.raises(ToolError, match="could not reach the search service") as e:
                await backend.search("q", 3)
            return str(e.value)
        finally:
            await backend.close()

    assert KEY not in run(unreachable())
    assert KEY not in caplog.text


def test_the_api_key_is_required_at_construction_and_can_come_from_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        WebBackend(web_settings(1))
    key_file = tmp_path / "serper.key"
    key_file.write_text(KEY + "\n")

    async def scenario(backend, port, hits):
        return await backend.search("q", 1)

    assert len(run(with_backend(scenario, search_api_key_file=key_file))) == 1
    with pytest.raises(ValueError, match="cannot be read"):
        WebBackend(web_settings(1, search_api_key_file=tmp_path / "missing.key"))
    # A keyless endpoint (a self-hosted proxy) is allowed explicitly.
    assert WebBackend(web_settings(1, search_api_key_env=None))._api_key is None


# -- fetch ---------------------------------------------------------------------------------------


def test_fetch_turns_html_into_text_and_decodes_charsets(api_key):
    async def scenario(backend, port, hits):
        return (
            await backend.fetch(f"http://127.0.0.1:{port}/page"),
            await backend.fetch(f"http://public.test:{port}/latin1"),
            await backend.fetch(f"http://127.0.0.1:{port}/plain"),
        )

    page, latin1, plain = run(with_backend(scenario))
    assert page.title == "Velmora - Atlas"
    assert page.text.split("\n") == [
        "Velmora",
        "Velmora is a country in the north.",
        "The capital of Velmora is Drennick.",
    ]
    assert "script text" not in page.text
    assert (latin1.title, latin1.text) == ("Café", "crème brûlée")
    assert (plain.title, plain.text) == ("", "line one\nline two")


def test_oversize_bodies_are_refused_with_or_without_content_length(api_key):
    async def scenario(backend, port, hits):
        messages = []
        for path in ["/big", "/big-chunked"]:
            with pytest.raises(ToolError, match="too large") as e:
                await backend.fetch(f"http://127.0.0.1:{port}{path}")
            messages.append(str(e.value))
        return messages

    declared, streamed = run(with_backend(scenario))
    assert "4096" in declared and "4096" in streamed


def test_unsupported_content_types_and_http_errors_are_refused(api_key):
    async def scenario(backend, port, hits):
        for path, pattern in [
            ("/image", "image/png is not supported"),
            ("/pdf", "application/pdf is not supported"),
            ("/missing", "HTTP 404"),
        ]:
            with pytest.raises(ToolError, match=pattern):
                await backend.fetch(f"http://127.0.0.1:{port}{path}")

    run(with_backend(scenario))


def test_redirects_are_followed_within_the_limit_and_refused_beyond_it(api_key):
    async def scenario(backend, port, hits):
        page = await backend.fetch(f"http://127.0.0.1:{port}/redirect/2")  # 3 redirects: the limit
        relative = await backend.fetch(f"http://127.0.0.1:{port}/relative/x")
        via_name = await backend.fetch(f"http://127.0.0.1:{port}/to/public")
        with pytest.raises(ToolError, match="too many redirects"):
            await backend.fetch(f"http://127.0.0.1:{port}/redirect/3")
        return page, relative, via_name, port

    page, relative, via_name, port = run(with_backend(scenario))
    assert page.url == f"http://127.0.0.1:{port}/page" and page.title == "Velmora - Atlas"
    assert relative.url == f"http://127.0.0.1:{port}/relative/page"
    assert via_name.url == f"http://public.test:{port}/page"


def test_redirects_into_private_addresses_are_refused_after_resolution(api_key):
    async def scenario(backend, port, hits):
        results = {}
        for where in ["localhost", "internal", "metadata", "decimal", "mapped", "file"]:
            with pytest.raises(FetchRefused) as e:
                await backend.fetch(f"http://public.test:{port}/to/{where}")
            results[where] = str(e.value)
        # A name that merely resolves to an allowed address is not itself allowed.
        with pytest.raises(FetchRefused, match="sneaky.test"):
            await backend.fetch(f"http://sneaky.test:{port}/secret")
        return results, hits["/secret"]

    results, secret_hits = run(with_backend(scenario))
    assert secret_hits == 0  # refused before any connection
    assert "localhost" in results["localhost"] and "loopback" in results["localhost"]
    assert "10.0.0.1, a private address" in results["internal"]
    assert "metadata" in results["metadata"]
    assert "loopback" in results["decimal"] and "loopback" in results["mapped"]
    assert "scheme 'file'" in results["file"]


def test_the_connection_uses_the_address_that_was_checked(api_key):
    # A rebinding DNS answers loopback (allowed here) once, then the metadata address. Only one
    # lookup may happen per connection, and it must be the one that was checked.
    answers = iter([["127.0.0.1"]])

    async def rebinding(host: str) -> list[str]:
        rebinding.calls.append(host)
        return next(answers, ["169.254.169.254"])

    rebinding.calls = []

    async def scenario(backend, port, hits):
        page = await backend.fetch(f"http://rebind.test:{port}/page")
        return page, hits["/page"]

    page, served = run(with_backend(scenario, resolver=rebinding, allow_private=True, allow_hosts=[]))
    assert page.title == "Velmora - Atlas" and served == 1
    assert rebinding.calls == ["rebind.test"]


def test_fetch_timeouts_and_retries(api_key):
    async def scenario(backend, port, hits):
        with pytest.raises(ToolError, match=r"timed out after 0\.5s"):
            await backend.fetch(f"http://127.0.0.1:{port}/slow")
        flaky = await backend.fetch(f"http://127.0.0.1:{port}/flaky")
        return flaky, hits["/flaky"]

    flaky, tries = run(with_backend(scenario, timeout_s=0.5))
    assert flaky.text == "second try works" and tries == 2


def test_toolbox_runs_on_the_web_backend_and_shows_refusals_to_the_model(api_key):
    async def scenario(backend, port, hits):
        toolbox = Toolbox(backend, passages_per_query=1)
        search = await toolbox.call(ParsedCall("search_urls", {"query": "velmora", "top_k": 2}), turn=0)
        read = await toolbox.call(
            ParsedCall("query_url", {"url": f"http://127.0.0.1:{port}/page", "goal": "capital"}), turn=1
        )
        refused = await toolbox.call(
            ParsedCall("query_url", {"url": "http://169.254.169.254/latest/", "goal": "g"}), turn=2
        )
        return search, read, refused

    search, read, refused = run(with_backend(scenario))
    assert search.urls == ["https://site0.example/velmora", "https://site1.example/velmora"]
    assert read.result == "Velmora - Atlas\nThe capital of Velmora is Drennick."
    assert refused.status == "tool_error" and "metadata" in refused.result


# -- cache ---------------------------------------------------------------------------------------


def test_redis_cache_serves_repeated_searches_and_fetches(api_key, redis_server):
    namespace = f"test-webtools-{uuid.uuid4().hex}"

    async def main():
        client = async_client(redis_server.url, redis_server.password)
        cache = RedisToolCache(client, namespace=namespace, ttl_s=120)
        try:

            async def scenario(backend, port, hits):
                first = await backend.search("velmora", 2)
                again = await backend.search("velmora", 2)
                other_k = await backend.search("velmora", 3)
                page = await backend.fetch(f"http://127.0.0.1:{port}/redirect/1")
                page_again = await backend.fetch(f"http://127.0.0.1:{port}/redirect/1/")
                assert first == again and len(other_k) == 3
                assert page == page_again
                ttl = await client.ttl(f"{namespace}:{cache_key('search', 'velmora', 2)}")
                return dict(hits), ttl

            return await with_backend(scenario, cache=cache)
        finally:
            await client.aclose()

    hits, ttl = run(main())
    assert hits["q:velmora"] == 2  # top_k 2 once, top_k 3 once
    assert hits["/redirect/1"] == 1 and hits["/page"] == 1
    assert 0 < ttl <= 120


def test_a_cached_page_never_bypasses_the_literal_address_check(api_key, redis_server):
    async def main():
        client = async_client(redis_server.url, redis_server.password)
        cache = RedisToolCache(client, namespace=f"test-webtools-{uuid.uuid4().hex}", ttl_s=60)
        try:
            await cache.set(
                cache_key("fetch", "https://10.0.0.1/admin"), json.dumps({"url": "x", "title": "t", "text": "s"})
            )

            async def scenario(backend, port, hits):
                with pytest.raises(FetchRefused):
                    await backend.fetch("http://10.0.0.1/admin")

            await with_backend(scenario, cache=cache)
        finally:
            await client.aclose()

    run(main())


def test_a_broken_cache_degrades_to_the_network(api_key):
    class Broken:
        async def get(self, key):
            raise ConnectionError("redis down")

        async def set(self, key, value):
            raise ConnectionError("redis down")

    async def scenario(backend, port, hits):
        return await backend.search("q", 1)

    assert len(run(with_backend(scenario, cache=Broken()))) == 1


# -- rate limiting -------------------------------------------------------------------------------


class FrozenClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_spaces_reservations_by_the_rate():
    clock = FrozenClock()
    bucket = TokenBucket(rate=2.0, burst=1.0, clock=clock)
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.5, 1.0, 1.5]
    clock.now += 10  # idle time refills only up to the burst
    assert [bucket.reserve() for _ in range(2)] == [0.0, 0.5]
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


def test_backend_rate_limits_search_globally_and_fetches_per_host(api_key):
    clock = FrozenClock()
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    async def scenario(backend, port, hits):
        await asyncio.gather(*(backend.search(f"q{i}", 1) for i in range(4)))
        search_waits = sorted(waits)
        waits.clear()
        await backend.fetch(f"http://public.test:{port}/page")
        await backend.fetch(f"http://127.0.0.1:{port}/page")  # another host: its own bucket
        await backend.fetch(f"http://public.test:{port}/plain")
        return search_waits, list(waits)

    search_waits, fetch_waits = run(
        with_backend(scenario, clock=clock, sleep=fake_sleep, search_rps=2.0, per_host_rps=1.0)
    )
    assert search_waits == [0.5, 1.0]  # burst of 2, then one every 0.5 s
    assert fetch_waits == [1.0]


# -- pure helpers --------------------------------------------------------------------------------


def test_pure_helpers():
    assert parse_search_results({}, 3) == []
    with pytest.raises(ToolError):
        parse_search_results([1, 2], 3)
    assert pick_charset(b"\xef\xbb\xbfabc", "latin-1", True) == "utf-8-sig"
    assert pick_charset(b'<meta charset="windows-1252">', None, True) == "cp1252"
    assert pick_charset(b"abc", "no-such-charset", False) == "utf-8"
    assert page_from_body("u", "application/json", None, b'{"a": 1}') == Page("u", "", '{"a": 1}')
    assert with_default_scheme("en.wikipedia.org/wiki/X") == "https://en.wikipedia.org/wiki/X"
    assert with_default_scheme("example.com:8080/x") == "https://example.com:8080/x"
    assert with_default_scheme("file:///etc/passwd") == "file:///etc/passwd"
    assert cache_key("search", "a b", 1) != cache_key("search", "a", "b 1")


# -- extractor -----------------------------------------------------------------------------------


EXTRACTOR_KEY_ENV = "RAPO_TEST_EXTRACTOR_KEY"


def chat_app(mode: dict, seen: list) -> web.Application:
    """A minimal OpenAI-compatible /v1/chat/completions endpoint."""

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({"auth": request.headers.get("Authorization"), **body})
        if mode["status"] != 200:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=mode["status"])
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": mode["content"]}}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


PAGE_TEXT = "Velmora is a country in the north.\nThe capital of Velmora is Drennick.\nRivers are slow."
ANSWER = "Rationale: the page names the capital.\nEvidence:\n- The capital of Velmora is Drennick.\nSummary: Drennick."


def test_llm_extractor_asks_for_goal_evidence_and_falls_back_to_passages(monkeypatch):
    monkeypatch.setenv(EXTRACTOR_KEY_ENV, "extractor-key")
    mode = {"status": 200, "content": f"<think>let me look</think>\n{ANSWER}"}
    seen: list = []

    async def main():
        async with serve(chat_app(mode, seen)) as port:
            settings = ExtractorSettings(
                base_url=f"http://127.0.0.1:{port}/v1",
                model="tiny-extractor",
                api_key_env=EXTRACTOR_KEY_ENV,
                timeout_s=5,
                fallback_passages=1,
            )
            extractor = LLMExtractor(settings)
            try:
                results = [await extractor.extract(PAGE_TEXT, "capital of Velmora")]
                mode["content"] = "ok"  # too short to be an answer
                results.append(await extractor.extract(PAGE_TEXT, "capital of Velmora"))
                mode["status"] = 400
                results.append(await extractor.extract(PAGE_TEXT, "capital of Velmora"))
                return results
            finally:
                await extractor.close()

    good, short, failed = run(main())
    assert good == ANSWER
    assert short == failed == "The capital of Velmora is Drennick."
    request = seen[0]
    assert request["auth"] == "Bearer extractor-key" and request["model"] == "tiny-extractor"
    assert request["temperature"] == 0.0
    prompt = request["messages"][-1]["content"]
    assert "capital of Velmora" in prompt and "Drennick" in prompt
    assert all(s in prompt for s in ("Rationale", "Evidence", "Summary"))


def test_llm_extractor_falls_back_when_the_endpoint_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def main():
        settings = ExtractorSettings(
            base_url=f"http://127.0.0.1:{dead_port}/v1", model="m", api_key_env=None, timeout_s=2
        )
        extractor = LLMExtractor(settings)
        try:
            return await extractor.extract(PAGE_TEXT, "slow rivers")
        finally:
            await extractor.close()

    assert "Rivers are slow." in run(main())
    assert clean_answer("</think>" + ANSWER) == ANSWER
    assert clean_answer("<think>only thinking</think>") is None
