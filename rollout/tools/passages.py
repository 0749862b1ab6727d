"""Goal-directed extraction without an LLM: split a page into passages, keep the k that match the goal best.

query_url returns these passages, so a small model reads a few sentences instead of a whole
page. The same tokenizer serves the corpus search index, so a word that makes a page rank in
search also makes its sentence rank inside the page.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# Question words and glue (plus the 's' and 't' of "Talm's", "don't"); kept small so that
# content words like "year" or "born" still count.
STOPWORDS: frozenset[str] = frozenset(
    """a an and are as at be been by did do does for from had has have he her his how i in into is it
    its me of on or our she that the their them there they this to was were what when where which who
    whom whose why will with you your s t""".split()
)

WINDOW_CHARS = 300
BM25_K1 = 1.5
BM25_B = 0.75

_WORD_RE = re.compile(r"[^\W_]+")
# A sentence ends at . ! or ? followed by whitespace; line breaks also end passages, since
# page text often has headings and list items without final punctuation.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def _stem(word: str) -> str:
    # Only plurals: "cities" -> "city", "capitals" -> "capital"; "ss" endings ("class") stay.
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words, plural 's' stripped, stopwords dropped."""
    return [_stem(w) for w in _WORD_RE.findall(text.lower()) if w not in STOPWORDS]


def _windows(sentence: str, width: int) -> list[str]:
    """Cut a long sentence at word boundaries into pieces of at most `width` characters."""
    pieces: list[str] = []
    current = ""
    for word in sentence.split():
        # A single word longer than the window (a URL, a base64 blob) is cut hard.
        while len(word) > width:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:width])
            word = word[width:]
        if not word:
            continue
        if current and len(current) + 1 + len(word) > width:
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    return pieces


def split_passages(text: str, window_chars: int = WINDOW_CHARS) -> list[str]:
    """Sentences of `text` in page order; sentences over `window_chars` become several windows."""
    passages: list[str] = []
    for sentence in _SENTENCE_END_RE.split(text):
        sentence = " ".join(sentence.split())
        if not sentence:
            continue
        if len(sentence) <= window_chars:
            passages.append(sentence)
        else:
            passages.extend(_windows(sentence, window_chars))
    return passages


def bm25_scores(docs: Sequence[Sequence[str]], query: Sequence[str]) -> list[float]:
    """Okapi BM25 (Lucene's idf, which is never negative) of each tokenized doc against the query."""
    n = len(docs)
    if n == 0 or not query:
        return [0.0] * n
    avgdl = sum(len(d) for d in docs) / n or 1.0
    counts = [Counter(d) for d in docs]
    scores = [0.0] * n
    for term in dict.fromkeys(query):  # each distinct query term once, in query order
        df = sum(1 for c in counts if term in c)
        if df == 0:
            continue
        idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        for i, c in enumerate(counts):
            tf = c.get(term, 0)
            if tf:
                norm = BM25_K1 * (1.0 - BM25_B + BM25_B * len(docs[i]) / avgdl)
                scores[i] += idf * tf * (BM25_K1 + 1.0) / (tf + norm)
    return scores


def rank_passages(text: str, goal: str, k: int) -> list[str]:
    """The k passages of `text` that best match `goal`, in page order.

    Ties go to the earlier passage; when nothing matches the goal the page's first k
    passages are returned, so the reader still sees how the page begins.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    passages = split_passages(text)
    if k == 0 or not passages:
        return []
    scores = bm25_scores([tokenize(p) for p in passages], tokenize(goal))
    if not any(scores):
        return passages[:k]
    best = sorted(range(len(passages)), key=lambda i: (-scores[i], i))[:k]
    return [passages[i] for i in sorted(best)]
