"""User question sets from JSONL (DuetQA / MuSiQue style), and a seeded train/held-out split.

Rows are `{"id"?, "question", "answer", "aliases"?}`; MuSiQue's `answer_aliases` counts as
aliases and other keys are ignored. A bad row stops loading with the file, the line and the
field, because a question without a usable gold answer would silently score 0 forever: that
includes a gold answer that the judge's normalisation empties ("The", "a", "...").
Files are read as untrusted input: not UTF-8, too-long lines and deep nesting are errors too.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from rewards.answer import normalize_answer
from rollout.bounded_json import jsonl_rows
from rollout.types import Question

# MuSiQue ids start with the hop count: "2hop__13548_13529", "3hop1__..."
_MUSIQUE_HOPS_RE = re.compile(r"^(\d)hop")


class DatasetError(ValueError):
    """A question file that cannot be used as is; the message says where and what to fix."""


_JSON_TYPES = {bool: "a boolean", list: "an array", dict: "an object"}


def _text_field(row: dict[str, Any], field: str, where: str, why: str) -> str:
    value = row.get(field)
    # JSON numbers are fine as answers ("1432"); booleans are almost surely a wrong column.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DatasetError(f"{where}: field {field!r} is missing or empty; {why}")
    if not isinstance(value, str):
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise DatasetError(
            f"{where}: field {field!r} must be a string (or a number), got {got} {json.dumps(value)[:60]}"
        )
    return value.strip()


def _aliases(row: dict[str, Any], where: str) -> tuple[str, ...]:
    found: list[str] = []
    for field in ("aliases", "answer_aliases"):
        values = row.get(field)
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DatasetError(f'{where}: field {field!r} must be a list of strings, e.g. ["NYC", "New York City"]')
        for i, v in enumerate(values):
            if not v.strip():
                # An empty alias would accept an empty model answer as correct.
                raise DatasetError(f"{where}: field {field!r} item {i} is empty; remove it or give the alias text")
            _judgeable(v, f"{field!r} item {i}", where)
            found.append(v.strip())
    return tuple(dict.fromkeys(found))


def _judgeable(gold: str, what: str, where: str) -> None:
    if not normalize_answer(gold):
        raise DatasetError(
            f"{where}: field {what} {gold[:60]!r} is only articles or punctuation, which answer matching ignores; "
            "no answer could ever match it: give the answer itself"
        )


def _hops(row: dict[str, Any], qid: str, where: str) -> int:
    hops = row.get("hops")
    if hops is None:
        match = _MUSIQUE_HOPS_RE.match(qid)
        return int(match.group(1)) if match else 1
    if not isinstance(hops, int) or isinstance(hops, bool) or hops < 1:
        raise DatasetError(f"{where}: field 'hops' must be a positive integer, got {hops!r}")
    return hops


def _row_id(row: dict[str, Any], n: int, where: str) -> str:
    qid = row.get("id")
    if qid is None:
        return f"line-{n}"
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip():
        raise DatasetError(f"{where}: field 'id' must be a non-empty string or integer, got {qid!r}; or leave it out")
    return str(qid).strip()


def load_questions_jsonl(path: str | Path, *, stream: BinaryIO | None = None) -> list[Question]:
    """Questions from a JSONL file (or a binary `stream` that `path` names), in file order; blank lines are skipped."""
    path = Path(path)
    questions: list[Question] = []
    seen: dict[str, int] = {}
    rows = jsonl_rows(path, error=DatasetError, example='{"question": ..., "answer": ...}', stream=stream)
    for n, where, row in rows:
        qid = _row_id(row, n, where)
        if qid in seen:
            raise DatasetError(f"{where}: field 'id' {qid!r} duplicates line {seen[qid]}; ids must be unique")
        seen[qid] = n
        question = _text_field(row, "question", where, "every row needs the question text")
        answer = _text_field(row, "answer", where, "every row needs a gold answer")
        _judgeable(answer, "'answer'", where)
        aliases = tuple(a for a in _aliases(row, where) if a != answer)
        hops = _hops(row, qid, where)
        questions.append(Question(id=qid, question=question, answer=answer, aliases=aliases, hops=hops))
    if not questions:
        raise DatasetError(f"{path}: no questions found; the file is empty (write one JSON object per line)")
    return questions


def split_questions(
    questions: Sequence[Question], heldout_fraction: float, seed: int
) -> tuple[list[Question], list[Question]]:
    """(train, heldout): a seeded random split, each part in the input order.

    With two or more questions both parts get at least one, so evaluation always has data.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    n = len(questions)
    if n < 2:
        return list(questions), []
    n_held = min(max(1, round(heldout_fraction * n)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    train = [q for i, q in enumerate(questions) if i not in held]
    heldout = [q for i, q in enumerate(questions) if i in held]
    return train, heldout


def mixed_hops_subset(questions: Sequence[Question], n: int) -> list[Question]:
    """The first ``n`` questions taken round-robin over hop counts (fewest hops first), each kept in input order.

    A small RL pool cut this way holds easy and hard questions alike, rather than whatever the
    first rows happen to be.
    """
    by_hops: dict[int, list[Question]] = {}
    for q in questions:
        by_hops.setdefault(q.hops, []).append(q)
    queues = [by_hops[h] for h in sorted(by_hops)]
    out: list[Question] = []
    depth = 0
    while len(out) < n and any(depth < len(queue) for queue in queues):
        out += [queue[depth] for queue in queues if depth < len(queue)][: n - len(out)]
        depth += 1
    return out
