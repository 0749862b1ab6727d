"""Rule-based step labeller: worked examples of every label, and properties over random trajectories."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.formulas import (
    EXPLORATION,
    QUERY_LABELS,
    REDUNDANTQUERY,
    REDUNDANTSEARCH,
    SEARCH_LABELS,
    UNIQUESEARCH,
    VERIFICATION,
    count_labels,
    stage2_reward,
)
from rewards.labeller import rule_labels, text_similarity, url_overlap_fraction
from rollout.tools.corpus import normalize_url
from rollout.types import ToolCall

WIKI = "https://wiki.example/Harbour_Bridge"
HISTORY = "https://history.example/bridges/harbour"
BIO = "https://bio.example/john-bradfield"
ENGINEERS = "https://engineers.example/list"
OBIT = "https://news.example/1943/bradfield-obituary"


def search(query: str, urls: list[str], status: str = "ok") -> ToolCall:
    return ToolCall("search_urls", {"query": query, "top_k": 3}, status=status, urls=urls if status == "ok" else [])


def query(url: str, goal: str, status: str = "ok") -> ToolCall:
    return ToolCall("query_url", {"url": url, "goal": goal}, status=status, urls=[url] if status == "ok" else [])


# "In which year was the architect of the Sydney Harbour Bridge born?" — one agent's calls,
# with the label each gets under B_v = 1 and B_v = 2 and why.
TRAJECTORY = [
    (search("architect of the Harbour Bridge", [WIKI, HISTORY]), UNIQUESEARCH, UNIQUESEARCH),  # first search
    (search("Harbour Bridge architect", [WIKI, HISTORY]), REDUNDANTSEARCH, REDUNDANTSEARCH),  # same words reordered
    (query(WIKI, "who designed the Harbour Bridge"), EXPLORATION, EXPLORATION),  # first read of WIKI
    (search("John Bradfield birth year", [BIO, ENGINEERS]), UNIQUESEARCH, UNIQUESEARCH),  # new entity
    (query(BIO, "birth year of John Bradfield"), EXPLORATION, EXPLORATION),  # new claim on a new URL
    (query(ENGINEERS, "John Bradfield birth year"), VERIFICATION, VERIFICATION),  # same claim, second source
    (query(OBIT, "year John Bradfield was born"), REDUNDANTQUERY, VERIFICATION),  # third source: over B_v = 1
    (
        query("http://bio.example/john-bradfield/", "birth year of John Bradfield"),
        REDUNDANTQUERY,
        REDUNDANTQUERY,
    ),  # same URL (normalised), same goal
    (query(WIKI, "opening date of the Harbour Bridge"), EXPLORATION, EXPLORATION),  # known URL, new goal
    (
        search("Bradfield engineer biography", [BIO, ENGINEERS, OBIT]),
        REDUNDANTSEARCH,
        REDUNDANTSEARCH,
    ),  # 2/3 of its URLs seen
    (
        query("https://archive.example/bridge", "construction cost", status="tool_error"),
        REDUNDANTQUERY,
        REDUNDANTQUERY,
    ),  # failed
    (search("Harbour Bridge construction cost", [], status="tool_error"), REDUNDANTSEARCH, REDUNDANTSEARCH),  # failed
    (
        search("Harbour Bridge construction cost", ["https://archive.example/bridge"]),
        UNIQUESEARCH,
        UNIQUESEARCH,
    ),  # the retry is new
    (ToolCall("browse", {"url": WIKI}, status="unknown_tool"), REDUNDANTSEARCH, REDUNDANTSEARCH),  # not a tool
]


def test_worked_example_with_one_verification_per_claim():
    calls = [c for c, _, _ in TRAJECTORY]
    assert rule_labels(calls, budget_verification=1) == [b1 for _, b1, _ in TRAJECTORY]


def test_worked_example_with_two_verifications_per_claim():
    calls = [c for c, _, _ in TRAJECTORY]
    assert rule_labels(calls, budget_verification=2) == [b2 for _, _, b2 in TRAJECTORY]


def test_worked_example_reward_rises_with_the_verification_budget():
    calls = [c for c, _, _ in TRAJECTORY]
    one, two = (count_labels(rule_labels(calls, budget_verification=b)) for b in (1, 2))
    assert (one.verification, one.redundant_query) == (1, 3)
    assert (two.verification, two.redundant_query) == (2, 2)
    assert stage2_reward(True, False, two) > stage2_reward(True, False, one)


def test_no_verification_budget_makes_every_cross_check_redundant():
    calls = [query(BIO, "birth year of John Bradfield"), query(ENGINEERS, "John Bradfield birth year")]
    assert rule_labels(calls, budget_verification=0) == [EXPLORATION, REDUNDANTQUERY]


def test_each_claim_has_its_own_verification_budget():
    calls = [
        query(BIO, "birth year of John Bradfield"),
        query(WIKI, "who designed the Harbour Bridge"),
        query(ENGINEERS, "John Bradfield birth year"),  # claim 1, first check
        query(HISTORY, "who designed Harbour Bridge"),  # claim 2, first check
        query(OBIT, "birth year John Bradfield"),  # claim 1, over budget
    ]
    assert rule_labels(calls) == [EXPLORATION, EXPLORATION, VERIFICATION, VERIFICATION, REDUNDANTQUERY]


def test_search_redundancy_by_query_words_or_returned_urls():
    first = search("tallest mountain in Oceania", ["https://a.example/1", "https://a.example/2"])
    # 2 of 4 returned URLs were seen: overlap 0.5, redundant at the default threshold.
    half_seen = search(
        "Puncak Jaya height",
        ["https://a.example/1", "http://A.example/2/", "https://b.example/3", "https://b.example/4"],
    )
    assert rule_labels([first, half_seen]) == [UNIQUESEARCH, REDUNDANTSEARCH]
    assert rule_labels([first, half_seen], url_overlap=0.75) == [UNIQUESEARCH, UNIQUESEARCH]
    # A plural and stopwords do not make a query new.
    assert rule_labels([first, search("the tallest mountains of Oceania", [])]) == [UNIQUESEARCH, REDUNDANTSEARCH]


def test_a_search_that_returned_nothing_is_judged_by_its_query_alone():
    calls = [search("Kiribati capital", []), search("Kiribati population", []), search("capital Kiribati", [])]
    assert rule_labels(calls) == [UNIQUESEARCH, UNIQUESEARCH, REDUNDANTSEARCH]


def test_malformed_calls_are_redundant_of_their_own_kind():
    calls = [
        ToolCall("search_urls", {}, status="bad_arguments"),
        ToolCall("query_url", {"url": WIKI}, status="bad_arguments"),
        ToolCall("", {}, status="malformed"),
        query(WIKI, "who designed the Harbour Bridge"),  # the failed read above does not count as a visit
    ]
    assert rule_labels(calls) == [REDUNDANTSEARCH, REDUNDANTQUERY, REDUNDANTSEARCH, EXPLORATION]


def test_no_tool_calls_no_labels():
    assert rule_labels([]) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_verification": -1}, "budget_verification"),
        ({"query_similarity": 0.0}, "query_similarity"),
        ({"url_overlap": 1.5}, "url_overlap"),
    ],
)
def test_bad_thresholds_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rule_labels([], **kwargs)


def test_similarity_helpers():
    assert text_similarity("Harbour Bridge architect", "architect of the harbour bridges") == 1.0
    assert text_similarity("the", "The ") == 1.0  # only stopwords: literal comparison
    assert text_similarity("the", "of") == 0.0
    assert url_overlap_fraction(set(), {"a"}) == 0.0
    assert url_overlap_fraction({"a", "b"}, {"b", "c"}) == 0.5


# ---------------------------------------------------------------- properties

WORDS = ["bridge", "architect", "born", "year", "harbour", "river", "capital", "the", "of"]
URLS = [f"https://site{i}.example/page" for i in range(5)] + ["http://SITE0.example/page/"]
STATUSES = st.sampled_from(["ok", "ok", "ok", "tool_error", "bad_arguments"])
TEXT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)


@st.composite
def tool_calls(draw) -> ToolCall:
    kind = draw(st.sampled_from(["search_urls", "search_urls", "query_url", "query_url", "query_url", "browse", ""]))
    status = draw(STATUSES)
    if kind == "search_urls":
        urls = draw(st.lists(st.sampled_from(URLS), max_size=3, unique=True))
        return search(draw(TEXT), urls, status)
    if kind == "query_url":
        return query(draw(st.sampled_from(URLS)), draw(TEXT), status)
    return ToolCall(kind, {}, status="unknown_tool" if kind else "malformed")


TRAJECTORIES = st.lists(tool_calls(), max_size=20)
BUDGETS = st.integers(0, 3)


@given(TRAJECTORIES, BUDGETS)
def test_one_label_per_call_of_the_calls_kind(calls, b_v):
    labels = rule_labels(calls, budget_verification=b_v)
    assert len(labels) == len(calls)
    for call, label in zip(calls, labels):
        if call.name == "search_urls":
            assert label in SEARCH_LABELS
        elif call.name == "query_url":
            assert label in QUERY_LABELS
        else:
            assert label == REDUNDANTSEARCH
        if not call.ok:
            assert label in (REDUNDANTSEARCH, REDUNDANTQUERY)


@given(TRAJECTORIES, BUDGETS)
def test_every_verification_belongs_to_a_claim_within_budget(calls, b_v):
    counts = count_labels(rule_labels(calls, budget_verification=b_v))
    # Every claim starts with an EXPLORATION and takes at most B_v verifications.
    assert counts.verification <= b_v * counts.exploration


@given(st.lists(st.sampled_from(URLS[:5]), min_size=1, max_size=5, unique=True), BUDGETS)
def test_one_claim_checked_on_many_sources(urls, b_v):
    labels = rule_labels([query(u, "year the bridge architect was born") for u in urls], budget_verification=b_v)
    checks = len(urls) - 1
    assert labels == [EXPLORATION] + [VERIFICATION] * min(b_v, checks) + [REDUNDANTQUERY] * max(0, checks - b_v)


@given(TRAJECTORIES)
def test_first_read_of_a_url_is_redundant_only_when_it_failed_or_the_budget_is_spent(calls):
    # With a budget no trajectory can spend, a first successful read is never redundant.
    labels = rule_labels(calls, budget_verification=len(calls))
    seen: set[str] = set()
    for call, label in zip(calls, labels):
        if call.name == "query_url" and call.ok:
            url = normalize_url(call.arguments["url"])
            if url not in seen:
                assert label in (EXPLORATION, VERIFICATION)
            seen.add(url)


@given(TRAJECTORIES, BUDGETS)
def test_a_larger_budget_only_turns_redundant_queries_into_verifications(calls, b_v):
    low, high = rule_labels(calls, budget_verification=b_v), rule_labels(calls, budget_verification=b_v + 1)
    for a, b in zip(low, high):
        assert a == b or (a, b) == (REDUNDANTQUERY, VERIFICATION)


@settings(max_examples=50)
@given(TRAJECTORIES, BUDGETS)
def test_labels_depend_only_on_earlier_calls(calls, b_v):
    full = rule_labels(calls, budget_verification=b_v)
    for k in range(len(calls)):
        assert rule_labels(calls[:k], budget_verification=b_v) == full[:k]


@given(TRAJECTORIES)
def test_the_first_successful_search_is_unique(calls):
    labels = rule_labels(calls)
    firsts = [label for call, label in zip(calls, labels) if call.name == "search_urls" and call.ok][:1]
    assert firsts in ([], [UNIQUESEARCH])
