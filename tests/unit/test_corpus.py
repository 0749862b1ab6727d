import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.chat_format import ParsedCall
from rollout.tools.base import ToolError
from rollout.tools.corpus import CorpusBackend, Document, load_corpus_jsonl, make_snippet, normalize_url
from rollout.tools.toolbox import Toolbox

DOCS = [
    Document("https://atlas.example/wiki/Velmora", "Velmora - Atlas",
             "Velmora is a country in the north. The capital of Velmora is Drennick."),
    Document("https://travel.example/guides/velmora", "Velmora travel guide",
             "Travel in Velmora is slow. The river ferries are old."),
    Document("https://atlas.example/wiki/Quenmar", "Quenmar - Atlas",
             "Quenmar is a country in the south. Its capital is Tolbek."),
]


def run(coro):
    return asyncio.run(coro)


def test_search_ranks_the_page_with_all_query_terms_first():
    backend = CorpusBackend(DOCS)
    hits = run(backend.search("Velmora capital", 3))
    assert [h.url for h in hits][:1] == ["https://atlas.example/wiki/Velmora"]
    assert {h.url for h in hits} == {d.url for d in DOCS}  # each shares a term
    assert hits[0].title == "Velmora - Atlas"


def test_search_respects_top_k_and_skips_non_matching_documents():
    backend = CorpusBackend(DOCS)
    assert len(run(backend.search("Velmora capital", 1))) == 1
    assert [h.url for h in run(backend.search("ferries", 5))] == ["https://travel.example/guides/velmora"]
    assert run(backend.search("ferries", 0)) == []


@pytest.mark.parametrize("query", ["", "   ", "the of and", "zanzibar"])
def test_search_with_nothing_to_match_returns_no_hits(query):
    assert run(CorpusBackend(DOCS).search(query, 3)) == []


def test_search_uses_the_title_and_the_shared_tokenizer():
    docs = [
        Document("https://a.example/1", "Harbours", "Nothing else here."),
        Document("https://a.example/2", "", "Ships."),
    ]
    hits = run(CorpusBackend(docs).search("harbour", 2))  # plural stripped on both sides
    assert [h.url for h in hits] == ["https://a.example/1"]


def test_ties_go_to_the_earlier_document():
    docs = [Document(f"https://a.example/{i}", "", "same words here") for i in range(5)]
    hits = run(CorpusBackend(docs).search("words", 3))
    assert [h.url for h in hits] == ["https://a.example/0", "https://a.example/1", "https://a.example/2"]


def test_snippet_is_cut_at_a_word_boundary_with_ellipsis():
    text = "Velmora is a country in the northern highlands of the old continent and more."
    assert make_snippet(text, 200) == text
    assert make_snippet(text, 30) == "Velmora is a country in the..."
    assert make_snippet("   spaced\n\n out  ", 50) == "spaced out"
    # a single word longer than the budget is cut hard rather than dropped
    assert make_snippet("abcdefghij klm", 5) == "abcde..."
    hits = run(CorpusBackend(DOCS, snippet_chars=20).search("ferries", 1))
    assert hits[0].snippet == "Travel in Velmora is..."


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.integers(1, 120))
def test_snippet_properties(text, max_chars):
    flat = " ".join(text.split())
    snippet = make_snippet(text, max_chars)
    if len(flat) <= max_chars:
        assert snippet == flat
    else:
        assert snippet.endswith("...")
        body = snippet[:-3]
        assert len(body) <= max_chars
        assert flat.startswith(body)


@pytest.mark.parametrize(
    "variant",
    [
        "https://atlas.example/wiki/Velmora",
        "  https://atlas.example/wiki/Velmora/ ",
        "http://atlas.example/wiki/Velmora",
        "HTTPS://ATLAS.Example/wiki/Velmora",
        "atlas.example/wiki/Velmora",
    ],
)
def test_fetch_normalises_the_url(variant):
    page = run(CorpusBackend(DOCS).fetch(variant))
    assert page.url == "https://atlas.example/wiki/Velmora"
    assert "Drennick" in page.text


def test_fetch_keeps_path_case():
    with pytest.raises(ToolError, match="page not found"):
        run(CorpusBackend(DOCS).fetch("https://atlas.example/wiki/velmora"))


def test_fetch_unknown_url_raises_tool_error_naming_it():
    with pytest.raises(ToolError) as err:
        run(CorpusBackend(DOCS).fetch("https://nowhere.example/x"))
    assert str(err.value) == "page not found: https://nowhere.example/x"


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"https?://[A-Za-z]{1,8}\.example(/[A-Za-z0-9]{1,6}){0,3}/?", fullmatch=True))
def test_normalize_url_is_idempotent_and_scheme_blind(url):
    key = normalize_url(url)
    assert normalize_url(key) == key
    assert normalize_url(url.replace("https://", "http://", 1)) == key
    assert not key.endswith("/")


def test_backend_rejects_duplicate_urls_and_empty_corpora():
    with pytest.raises(ValueError, match="duplicate document URL"):
        CorpusBackend([DOCS[0], Document("http://atlas.example/wiki/Velmora/", "", "x")])
    with pytest.raises(ValueError, match="empty"):
        CorpusBackend([])


def test_close_is_harmless():
    backend = CorpusBackend(DOCS)
    run(backend.close())
    assert run(backend.search("Velmora", 1))


def test_toolbox_runs_search_and_query_url_on_the_corpus():
    toolbox = Toolbox(CorpusBackend(DOCS), passages_per_query=1)

    async def episode():
        search = await toolbox.call(ParsedCall("search_urls", {"query": "Velmora capital"}), turn=0)
        read = await toolbox.call(
            ParsedCall("query_url", {"url": search.urls[0], "goal": "capital of Velmora"}), turn=1
        )
        missing = await toolbox.call(ParsedCall("query_url", {"url": "https://x.example/", "goal": "g"}), turn=2)
        return search, read, missing

    search, read, missing = run(episode())
    assert search.ok and search.urls[0] == "https://atlas.example/wiki/Velmora"
    assert read.ok and read.result.endswith("The capital of Velmora is Drennick.")
    assert missing.status == "tool_error" and "page not found" in missing.result


def write_lines(tmp_path, lines):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_corpus_round_trip(tmp_path):
    rows = [{"url": d.url, "title": d.title, "text": d.text, "extra": 1} for d in DOCS]
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, "   ")
    lines.append(json.dumps({"url": "https://b.example/no-title", "text": "untitled"}))
    docs = load_corpus_jsonl(write_lines(tmp_path, lines))
    assert docs[:3] == DOCS
    assert docs[3] == Document("https://b.example/no-title", "", "untitled")


GOOD = json.dumps({"url": "https://a.example/1", "title": "t", "text": "x"})


@pytest.mark.parametrize(
    ("bad_line", "field_or_problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"title": "t", "text": "x"}), "field 'url'"),
        (json.dumps({"url": "  ", "text": "x"}), "field 'url'"),
        (json.dumps({"url": "https://a.example/2", "text": ""}), "field 'text'"),
        (json.dumps({"url": "https://a.example/2"}), "field 'text'"),
        (json.dumps({"url": "https://a.example/2", "title": 5, "text": "x"}), "field 'title'"),
        (json.dumps({"url": "http://A.example/1/", "text": "x"}), "duplicates line 1"),
    ],
)
def test_load_corpus_bad_rows_name_line_and_field(tmp_path, bad_line, field_or_problem):
    path = write_lines(tmp_path, [GOOD, "", bad_line])
    with pytest.raises(ValueError) as err:
        load_corpus_jsonl(path)
    message = str(err.value)
    assert f"{path}: line 3:" in message
    assert field_or_problem in message


def test_load_corpus_empty_file(tmp_path):
    path = write_lines(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="no documents"):
        load_corpus_jsonl(path)


def test_load_corpus_unreadable_files_name_the_problem(tmp_path):
    from rollout.tools.corpus import CorpusError

    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps({"url": "https://a.example/1", "text": "Café"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(CorpusError, match=f"^{latin}: line 1: not UTF-8"):
        load_corpus_jsonl(latin)
    with pytest.raises(CorpusError, match=f"^{tmp_path} is a directory"):
        load_corpus_jsonl(tmp_path)
    deep = write_lines(tmp_path, ['{"url": "https://a.example/1", "text": "x", "m": ' + "[" * 5000 + "]" * 5000 + "}"])
    with pytest.raises(CorpusError, match="line 1: invalid JSON \\(nested deeper than 32 levels"):
        load_corpus_jsonl(deep)
