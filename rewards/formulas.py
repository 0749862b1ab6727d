"""Reward formulas of docs/rapo.md §2: the stage-1 outcome reward and the stage-2 step-level reward.

Pure arithmetic on already-judged facts (format ok, answer correct, one label per tool call);
the judge and the labeller live elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

UNIQUESEARCH = "UNIQUESEARCH"
REDUNDANTSEARCH = "REDUNDANTSEARCH"
EXPLORATION = "EXPLORATION"
VERIFICATION = "VERIFICATION"
REDUNDANTQUERY = "REDUNDANTQUERY"

SEARCH_LABELS = (UNIQUESEARCH, REDUNDANTSEARCH)  # labels of a search_urls call
QUERY_LABELS = (EXPLORATION, VERIFICATION, REDUNDANTQUERY)  # labels of a query_url call
LABELS = SEARCH_LABELS + QUERY_LABELS


@dataclass(frozen=True)
class LabelCounts:
    unique_search: int = 0
    redundant_search: int = 0
    exploration: int = 0
    verification: int = 0
    redundant_query: int = 0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"LabelCounts.{name} must be a non-negative int, got {value!r}")

    @property
    def total(self) -> int:
        """T, the number of tool calls."""
        return (
            self.unique_search + self.redundant_search + self.exploration + self.verification + self.redundant_query
        )

    @property
    def redundancy(self) -> float:
        """ρ = (n_redundant_search + n_redundant_query) / T; 0 for a rollout without tool calls."""
        t = self.total
        return 0.0 if t == 0 else (self.redundant_search + self.redundant_query) / t

    @property
    def delta_search(self) -> int:
        """Δ_S = n_unique_search − n_redundant_search (may be negative)."""
        return self.unique_search - self.redundant_search

    @property
    def delta_query(self) -> int:
        """Δ_Q = (n_exploration + n_verification) − n_redundant_query (may be negative)."""
        return self.exploration + self.verification - self.redundant_query


def count_labels(labels: Iterable[str]) -> LabelCounts:
    """Tally per-tool-call labels; an unknown label is an error, not a silent zero."""
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of labels, not a single str")
    counts = Counter(labels)
    unknown = sorted(repr(k) for k in counts if k not in LABELS)
    if unknown:
        raise ValueError(f"unknown tool-call label(s) {', '.join(unknown)}; allowed: {', '.join(LABELS)}")
    return LabelCounts(
        unique_search=counts[UNIQUESEARCH],
        redundant_search=counts[REDUNDANTSEARCH],
        exploration=counts[EXPLORATION],
        verification=counts[VERIFICATION],
        redundant_query=counts[REDUNDANTQUERY],
    )


def _check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def stage1_reward(format_ok: bool, correct: bool, format_weight: float = 0.1) -> float:
    """r = w·R_format + (1 − w)·R_answer (paper Eq. 4, w = 0.1): in [0, 1]."""
    _check_weight("format_weight", format_weight)
    return format_weight * float(format_ok) + (1.0 - format_weight) * float(correct)


def stage2_reward(
    format_ok: bool,
    correct: bool,
    labels: Iterable[str] | LabelCounts,
    *,
    format_weight: float = 0.1,
    c_search: float = 0.2,
    c_query: float = 0.2,
    cap_search: float = 8,
    cap_query: float = 16,
    clamp_delta: bool = False,
) -> float:
    """Steerable step-level reward (paper Eq. 7–8, docs/rapo.md §2.2).

    Correct:   w·R_format + max(1 − ρ, 0.5)                        → [0.5, 1 + w]
    Incorrect: w·R_format + c_S·min(1, Δ_S/C_S) + c_Q·min(1, Δ_Q/C_Q) → at most w + c_S + c_Q

    Unlike stage 1 the correct branch carries no (1 − w) factor: that is the paper's formula,
    and it keeps every correct rollout at or above every incorrect one (0.5 with defaults).
    The paper puts no floor under Δ, so an incorrect rollout full of redundant calls can score
    below zero; ``clamp_delta=True`` floors each Δ at 0 so the incorrect branch stays ≥ 0.
    """
    _check_weight("format_weight", format_weight)
    if c_search < 0 or c_query < 0:
        raise ValueError(f"c_search and c_query must be >= 0, got {c_search}, {c_query}")
    if cap_search <= 0 or cap_query <= 0:
        raise ValueError(f"cap_search and cap_query must be > 0, got {cap_search}, {cap_query}")
    counts = labels if isinstance(labels, LabelCounts) else count_labels(labels)
    base = format_weight * float(format_ok)
    if correct:
        return base + max(1.0 - counts.redundancy, 0.5)
    d_s, d_q = counts.delta_search, counts.delta_query
    if clamp_delta:
        d_s, d_q = max(d_s, 0), max(d_q, 0)
    return base + c_search * min(1.0, d_s / cap_search) + c_query * min(1.0, d_q / cap_query)
