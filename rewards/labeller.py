"""Rule-based step labeller: one stage-2 label per tool call, from the call history alone.

This is the offline default (docs/rapo.md §2.3) and the fallback when the LLM labeller fails.
The paper's labels are semantic judgements by GPT-4.1; here "semantically the same" is
approximated by token-set similarity of queries and goals (the tokenizer of the search
index, so plurals and stopwords do not make two queries look different) and by overlap of
the URLs a search returned.

Choices the paper leaves open, made here so that every call gets a label and the stage-2
reward never rewards a call that did nothing:
- A failed call (status other than "ok": bad JSON, bad arguments, backend error) added
  nothing, so it is redundant: REDUNDANTSEARCH for search_urls, REDUNDANTQUERY for query_url.
  It also leaves no trace in the history: retrying a search that failed is not redundant.
- A call to any other tool name (a malformed or unknown-tool call) is REDUNDANTSEARCH: it
  must be a redundant label so that it lowers the reward, and the search side is where
  Δ_S is capped lowest (C_S = 8), so a stray call costs about as much as a wasted search.
- A query_url of a new URL whose goal repeats an earlier claim is a cross-source check:
  VERIFICATION while the claim has fewer than B_v verifications, REDUNDANTQUERY after. So
  the first visit of a URL can be redundant, but only through a spent verification budget.
- A query_url of an already-read URL is REDUNDANTQUERY when its goal repeats a goal already
  asked of that URL, and EXPLORATION when it asks that page something new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rewards.formulas import (
    EXPLORATION,
    REDUNDANTQUERY,
    REDUNDANTSEARCH,
    UNIQUESEARCH,
    VERIFICATION,
)
from rollout.tools.corpus import normalize_url
from rollout.tools.passages import tokenize
from rollout.types import ToolCall

SEARCH_TOOL = "search_urls"
QUERY_TOOL = "query_url"


def text_similarity(a: str, b: str) -> float:
    """Jaccard similarity of the token sets of two queries or goals, in [0, 1].

    Two texts made only of stopwords have no tokens to compare; they count as the same
    text only when they are literally the same (ignoring case and spacing).
    """
    ta, tb = set(tokenize(a)), set(tokenize(b))
    if not ta and not tb:
        return 1.0 if " ".join(a.casefold().split()) == " ".join(b.casefold().split()) else 0.0
    return len(ta & tb) / len(ta | tb)


def url_overlap_fraction(current: set[str], earlier: set[str]) -> float:
    """|A ∩ B| / |A| with A the URLs this search returned; 0 when it returned none."""
    return len(current & earlier) / len(current) if current else 0.0


def _str_argument(call: ToolCall, name: str) -> str | None:
    value = call.arguments.get(name) if isinstance(call.arguments, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def _query_url(call: ToolCall) -> str | None:
    url = _str_argument(call, "url")
    if url is None and call.urls:
        url = call.urls[0]
    return normalize_url(url) if url else None


@dataclass
class _Claim:
    """A fact the agent looked for with query_url: the goals that asked for it and how often it was cross-checked."""

    goals: list[str]
    verifications: int = 0


@dataclass
class _History:
    searches: list[tuple[str, set[str]]] = field(default_factory=list)  # (query, normalised returned URLs)
    goals_by_url: dict[str, list[str]] = field(default_factory=dict)
    claims: list[_Claim] = field(default_factory=list)


def _label_search(call: ToolCall, history: _History, query_similarity: float, url_overlap: float) -> str:
    query = _str_argument(call, "query")
    if not call.ok or query is None:
        return REDUNDANTSEARCH
    urls = {normalize_url(u) for u in call.urls if u}
    redundant = any(
        text_similarity(query, earlier_query) >= query_similarity
        or (urls and url_overlap_fraction(urls, earlier_urls) >= url_overlap)
        for earlier_query, earlier_urls in history.searches
    )
    history.searches.append((query, urls))
    return REDUNDANTSEARCH if redundant else UNIQUESEARCH


def _matching_claim(goal: str, claims: Sequence[_Claim], query_similarity: float) -> _Claim | None:
    """The claim whose goals are most similar to `goal` (earliest on ties), if any reaches the threshold."""
    best, best_score = None, query_similarity
    for claim in claims:
        score = max(text_similarity(goal, g) for g in claim.goals)
        if score >= best_score and (best is None or score > best_score):
            best, best_score = claim, score
    return best


def _remember_goal(goal: str, claims: list[_Claim], query_similarity: float) -> None:
    claim = _matching_claim(goal, claims, query_similarity)
    if claim is None:
        claims.append(_Claim([goal]))
    else:
        claim.goals.append(goal)


def _label_query(call: ToolCall, history: _History, budget_verification: int, query_similarity: float) -> str:
    url = _query_url(call)
    goal = _str_argument(call, "goal") or ""
    if not call.ok or url is None:
        return REDUNDANTQUERY
    earlier_goals = history.goals_by_url.get(url)
    if earlier_goals is not None:
        if any(text_similarity(goal, g) >= query_similarity for g in earlier_goals):
            return REDUNDANTQUERY
        # Asking a page something new is exploring it, even when another page was asked the
        # same thing before: VERIFICATION is reserved for new sources.
        earlier_goals.append(goal)
        _remember_goal(goal, history.claims, query_similarity)
        return EXPLORATION
    history.goals_by_url[url] = [goal]
    claim = _matching_claim(goal, history.claims, query_similarity)
    if claim is None:
        history.claims.append(_Claim([goal]))
        return EXPLORATION
    claim.goals.append(goal)
    if claim.verifications < budget_verification:
        claim.verifications += 1
        return VERIFICATION
    return REDUNDANTQUERY


def rule_labels(
    tool_calls: Sequence[ToolCall],
    *,
    budget_verification: int = 1,
    query_similarity: float = 0.6,
    url_overlap: float = 0.5,
) -> list[str]:
    """One label per tool call, in order (see the module docstring for the rules)."""
    if budget_verification < 0:
        raise ValueError(f"budget_verification (B_v) must be >= 0, got {budget_verification}")
    if not 0.0 < query_similarity <= 1.0:
        raise ValueError(f"query_similarity must be in (0, 1], got {query_similarity}")
    if not 0.0 < url_overlap <= 1.0:
        raise ValueError(f"url_overlap must be in (0, 1], got {url_overlap}")
    history = _History()
    labels = []
    for call in tool_calls:
        if call.name == SEARCH_TOOL:
            labels.append(_label_search(call, history, query_similarity, url_overlap))
        elif call.name == QUERY_TOOL:
            labels.append(_label_query(call, history, budget_verification, query_similarity))
        else:
            labels.append(REDUNDANTSEARCH)
    return labels
