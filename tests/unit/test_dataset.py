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
        (json.dumps({"question": "q?", "answer": ""}), "field 'answer' is missing or empty; every row needs a gold answer"),
        (json.dumps({"question": "q?", "answer": None}), "field 'answer' is missing or empty"),
        (json.dumps({"question": "q?", "answer": True}), "field 'answer' must be a string (or a number), got a boolean true"),
        (json.dumps({"question": "q?", "answer": ["x"]}), "field 'answer' must be a string (or a number), got an array"),
        (json.dumps({"question": {"text": "q?"}, "answer": "x"}), "field 'question' must be a string (or a number), got an object"),
        (json.dumps({"question": "q?", "answer": "x", "aliases": None, "answer_aliases": {"y": 1}}),
         "field 'answer_aliases' must be a list of strings"),
        ('{"question": "q?", "answer": "x"} trailing', "invalid JSON (Extra data at column 35)"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"question": "q?", "answer": "x", "aliases": "y"}), "field 'aliases' must be a list of strings"),
        (json.dumps({"question": "q?", "answer": "x", "aliases": ["y", 3]}), "field 'aliases' must be a list of strings"),
        (json.dumps({"question": "q?", "answer": "x", "answer_aliases": ["y", " "]}), "field 'answer_aliases' item 1 is empty"),
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
