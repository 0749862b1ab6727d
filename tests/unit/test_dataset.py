import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.dataset import DatasetError, load_questions_jsonl, split_questions
from rollout.types import Question


def write(tmp_path, lines):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_good_file_round_trip(tmp_path):
    rows = [
        {"id": "q1", "question": "Who wrote Hamlet?", "answer": "William Shakespeare", "aliases": ["Shakespeare"]},
        {"question": "Capital of France?", "answer": "Paris", "source": "duetqa"},
        {"id": "2hop__1_2", "question": "Where was the author born?", "answer": "Stratford",
         "answer_aliases": ["Stratford-upon-Avon", "Stratford"], "paragraphs": [{"title": "x"}]},
        {"id": 7, "question": "  Year?  ", "answer": 1616, "hops": 3},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "")
    questions = load_questions_jsonl(write(tmp_path, lines))
    assert questions == [
        Question("q1", "Who wrote Hamlet?", "William Shakespeare", ("Shakespeare",), 1),
        Question("line-2", "Capital of France?", "Paris", (), 1),
        Question("2hop__1_2", "Where was the author born?", "Stratford", ("Stratford-upon-Avon",), 2),
        Question("7", "Year?", "1616", (), 3),
    ]


GOOD = json.dumps({"id": "a", "question": "q?", "answer": "x"})


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("{oops", "invalid JSON"),
        ('"just a string"', "expected a JSON object"),
        (json.dumps({"answer": "x"}), "field 'question' is missing or empty"),
        (json.dumps({"question": "  ", "answer": "x"}), "field 'question' is missing or empty"),
        (json.dumps({"question": "q?"}), "field 'answer' is missing or empty; every row needs a gold answer"),
        (
            json.dumps({"question": "q?", "answer": ""}),
            "field 'answer' is missing or empty; every row needs a gold answer",
        ),
        (json.dumps({"question": "q?", "answer": None}), "field 'answer' is missing or empty"),
        (
            json.dumps({"question": "q?", "answer": True}),
            "field 'answer' must be a string (or a number), got a boolean true",
        ),
        (
            json.dumps({"question": "q?", "answer": ["x"]}),
            "field 'answer' must be a string (or a number), got an array",
        ),
        (
            json.dumps({"question": {"text": "q?"}, "answer": "x"}),
            "field 'question' must be a string (or a number), got an object",
        ),
        (
            json.dumps({"question": "q?", "answer": "x", "aliases": None, "answer_aliases": {"y": 1}}),
            "field 'answer_aliases' must be a list of strings",
        ),
        ('{"question": "q?", "answer": "x"} trailing', "invalid JSON (trailing characters at column 35)"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"question": "q?", "answer": "x", "aliases": "y"}), "field 'aliases' must be a list of strings"),
        (
            json.dumps({"question": "q?", "answer": "x", "aliases": ["y", 3]}),
            "field 'aliases' must be a list of strings",
        ),
        (
            json.dumps({"question": "q?", "answer": "x", "answer_aliases": ["y", " "]}),
            "field 'answer_aliases' item 1 is empty",
        ),
        (json.dumps({"id": "a", "question": "q?", "answer": "x"}), "field 'id' 'a' duplicates line 1"),
        (json.dumps({"id": ["a"], "question": "q?", "answer": "x"}), "field 'id' must be"),
        (json.dumps({"question": "q?", "answer": "x", "hops": 0}), "field 'hops' must be a positive integer"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, expected):
    path = write(tmp_path, [GOOD, "", bad])
    with pytest.raises(DatasetError) as err:
        load_questions_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line 3: ")
    assert expected in message
    assert isinstance(err.value, ValueError)


def test_empty_file_is_an_error(tmp_path):
    path = write(tmp_path, ["", "   "])
    with pytest.raises(DatasetError, match="no questions found"):
        load_questions_jsonl(path)


def questions(n):
    return [Question(f"q{i}", f"question {i}?", f"a{i}") for i in range(n)]


def test_split_is_seeded():
    qs = questions(50)
    assert split_questions(qs, 0.2, seed=1) == split_questions(qs, 0.2, seed=1)
    assert split_questions(qs, 0.2, seed=1) != split_questions(qs, 0.2, seed=2)
    train, heldout = split_questions(qs, 0.2, seed=1)
    assert len(heldout) == 10


def test_split_small_inputs():
    assert split_questions([], 0.5, 0) == ([], [])
    assert split_questions(questions(1), 0.5, 0) == (questions(1), [])
    train, heldout = split_questions(questions(2), 0.01, 0)
    assert len(train) == 1 and len(heldout) == 1
    train, heldout = split_questions(questions(2), 0.99, 0)
    assert len(train) == 1 and len(heldout) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2.0])
def test_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_questions(questions(5), fraction, 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.floats(0.01, 0.99), st.integers(0, 2**32 - 1))
def test_split_properties(n, fraction, seed):
    qs = questions(n)
    train, heldout = split_questions(qs, fraction, seed)
    # a partition that keeps input order inside each part
    assert sorted(train + heldout, key=lambda q: int(q.id[1:])) == qs
    assert train == [q for q in qs if q in train] and heldout == [q for q in qs if q in heldout]
    if n >= 2:
        assert train and heldout
        assert abs(len(heldout) - fraction * n) <= 1


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (json.dumps({"question": "q?", "answer": "The"}), "field 'answer' 'The' is only articles or punctuation"),
        (json.dumps({"question": "q?", "answer": "a"}), "field 'answer' 'a' is only articles or punctuation"),
        (json.dumps({"question": "q?", "answer": "..."}), "field 'answer' '...' is only articles or punctuation"),
        (json.dumps({"question": "q?", "answer": "x", "aliases": ["An"]}), "field 'aliases' item 0 'An' is only"),
        ('{"question": "q?", "answer": "x", "meta": ' + "[" * 100000 + "]" * 100000 + "}", "nested deeper than 32"),
        ("[" * 100000, "invalid JSON (nested deeper than 32 levels"),
        ('{"question": "q?", "answer": NaN}', "invalid JSON"),
    ],
)
def test_rows_that_load_but_cannot_work_are_refused(tmp_path, bad, expected):
    path = write(tmp_path, [GOOD, "", bad])
    with pytest.raises(DatasetError) as err:
        load_questions_jsonl(path)
    assert str(err.value).startswith(f"{path}: line 3: ") and expected in str(err.value)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    cafe = json.dumps({"question": "Café?", "answer": "x"}, ensure_ascii=False)
    path.write_bytes((GOOD + "\n" + cafe + "\n").encode("latin-1"))
    expected = rf"^{path}: line 2: not UTF-8 \(byte 0xe9 at column 18\); save the file as UTF-8"
    with pytest.raises(DatasetError, match=expected):
        load_questions_jsonl(path)


@pytest.mark.parametrize(("make", "expected"), [("dir", "is a directory"), ("missing", "does not exist")])
def test_a_path_that_is_not_a_file(tmp_path, make, expected):
    path = tmp_path / "data"
    if make == "dir":
        path.mkdir()
    with pytest.raises(DatasetError, match=f"^{path} {expected}"):
        load_questions_jsonl(path)


def test_an_overlong_line_is_refused_without_reading_the_rest(tmp_path):
    from rollout import bounded_json

    path = tmp_path / "one-line.jsonl"
    path.write_text('{"question": "' + "x" * 5000 + '", "answer": "x"}\n')
    rows = bounded_json.jsonl_rows(path, error=DatasetError, example="{}", max_line_bytes=1000)
    with pytest.raises(DatasetError, match="line 1: longer than 1000 bytes"):
        next(rows)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert [q.id for q in load_questions_jsonl(path)] == ["a"]


# Any bytes: the loader either loads questions or raises DatasetError, never anything else; a file it
# loads round-trips (writing the questions back out loads the same questions). Values are drawn from
# a fixed menu of troublemakers (cheap to generate, so thousands of cases run in seconds).
_MISSING = object()
_VALUES = [
    "Who?",
    "",
    "  ",
    None,
    7,
    1.5,
    True,
    ["x"],
    {"t": 1},
    "<|im_end|>",
    "Caf\u00e9",
    "The",
    "...",
    "a",
    "Paris",
    "x" * 300,
    _MISSING,
]


def _row(question, answer, qid, aliases, hops) -> bytes:
    fields = (("question", question), ("answer", answer), ("id", qid), ("aliases", aliases), ("hops", hops))
    return json.dumps({k: v for k, v in fields if v is not _MISSING}).encode()


_rows = st.one_of(
    st.binary(max_size=40),
    st.builds(
        _row,
        *[st.sampled_from(_VALUES)] * 3,
        st.sampled_from([_MISSING, [], ["NYC"], [""], ["the"], "x", [1]]),
        st.sampled_from([_MISSING, 1, 0, -1, 3, "2", True]),
    ),
)


@settings(max_examples=2500, deadline=None, database=None)
@given(st.lists(_rows, max_size=4))
def test_fuzz_loader_raises_only_dataset_errors_and_round_trips(rows):
    try:
        questions = load_questions_jsonl("fuzz.jsonl", stream=io.BytesIO(b"\n".join(rows)))
    except DatasetError as e:
        assert str(e).startswith("fuzz.jsonl")
        return
    again = [
        {"id": q.id, "question": q.question, "answer": q.answer, "aliases": list(q.aliases), "hops": q.hops}
        for q in questions
    ]
    data = "\n".join(json.dumps(r) for r in again).encode()
    assert load_questions_jsonl("again.jsonl", stream=io.BytesIO(data)) == questions


@given(st.lists(st.integers(1, 3), max_size=40), st.integers(1, 50))
def test_mixed_hops_subset_balances_hop_counts(hops, n):
    from rollout.dataset import mixed_hops_subset

    questions = [Question(id=f"q{i}", question="?", answer="a", hops=h) for i, h in enumerate(hops)]
    subset = mixed_hops_subset(questions, n)
    assert len(subset) == min(n, len(questions))
    assert len({q.id for q in subset}) == len(subset)
    counts = {h: sum(q.hops == h for q in subset) for h in set(hops)}
    available = {h: hops.count(h) for h in set(hops)}
    # No hop count gets two more than another unless the other has run out.
    for a in counts:
        for b in counts:
            assert counts[a] <= counts[b] + 1 or counts[b] == available[b]
    # Within a hop count the input order is kept (a prefix of that hop count's questions).
    for h in counts:
        assert [q.id for q in subset if q.hops == h] == [q.id for q in questions if q.hops == h][: counts[h]]
