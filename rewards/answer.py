"""Rule-based answer judge: normalised exact match against the gold answer and its aliases.

This is the offline default judge (docs/rapo.md §2.4). It is deliberately strict: a model that
pads its answer ("Paris, France" for "Paris") is wrong, because a lenient judge teaches the
policy to hedge. The LLM judge is where semantic equivalence belongs.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence

ARTICLES = frozenset({"a", "an", "the"})

# Punctuation that joins two words ("Jean-Paul", "and/or") becomes a space so that the two
# words stay two words; all other punctuation is deleted so that "U.S." matches "US" and
# "O'Brien" matches "OBrien" (the SQuAD convention).
_JOINERS = frozenset({"/", "\\", "_"})
# ASCII symbols such as $ % + are not Unicode punctuation, but the SQuAD convention drops them.
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_joiner(ch: str) -> bool:
    return ch in _JOINERS or unicodedata.category(ch) == "Pd"


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Canonical form for comparison: accents, case, punctuation, articles and spacing removed.

    >>> normalize_answer("  The Café-Bar, São Paulo! ")
    'cafe bar sao paulo'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}")
    # NFKD, then casefold, then NFKD again is Unicode's recipe for caseless matching
    # (casefold can produce characters that decompose further, e.g. 'ẞ' -> 'ss').
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())
    chars = []
    for ch in text:
        if unicodedata.combining(ch):
            continue
        if _is_joiner(ch):
            chars.append(" ")
        elif not _is_punct(ch):
            chars.append(ch)
    return " ".join(w for w in "".join(chars).split() if w not in ARTICLES)


def rule_judge(answer: str | None, golds: Sequence[str]) -> bool:
    """True when the normalised answer equals the normalised form of any gold answer.

    No answer (None, empty, or only punctuation/articles) is incorrect. Normalisation drops
    articles anywhere, so "The Louvre" matches "Louvre"; nothing looser is accepted.
    """
    if isinstance(golds, str):
        # A bare string is a Sequence of characters: matching against single letters is never meant.
        raise TypeError("golds must be a sequence of gold answers, not a single str")
    if len(golds) == 0:
        raise ValueError("rule_judge needs at least one gold answer")
    if answer is None:
        return False
    predicted = normalize_answer(answer)
    if not predicted:
        return False
    return any(predicted == normalize_answer(g) for g in golds)
