"""`rapo eval`'s pure parts: which config it takes, the eval requests, and bad question files."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from cluster.config import PipelineConfig, load_config
from cluster.engines import eval_requests
from cluster.evaluate import DEMO_CONFIG, resolve_config_path, summary_path_for
from rollout.episodes import episode_seed
from rollout.types import Question


def test_config_is_the_given_one_else_the_runs_else_the_demo(tmp_path):
    plain = tmp_path / "model"
    plain.mkdir()
    assert resolve_config_path(plain, None) == DEMO_CONFIG and DEMO_CONFIG.exists()
    assert resolve_config_path(plain, "x.yaml").name == "x.yaml"

    run = tmp_path / "run"
    (run / "policy").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    # A folder beside a config.yaml is not a run's policy until it carries rapo_policy.json.
    assert resolve_config_path(run / "policy", None) == DEMO_CONFIG
    (run / "policy" / "rapo_policy.json").write_text("{}")
    assert resolve_config_path(run / "policy", None) == run / "config.yaml"
    assert resolve_config_path(run / "policy", "x.yaml").name == "x.yaml"


def test_eval_requests_are_the_controllers():
    p = PipelineConfig(seed=7, eval_temperature=0.3)
    qs = [Question("a", "qa?", "1"), Question("b", "qb?", "2")]
    reqs = eval_requests(qs, p)
    assert [(r.question, r.sample_index, r.temperature, r.top_p) for r in reqs] == [(q, 0, 0.3, 1.0) for q in qs]
    assert [r.seed for r in reqs] == [episode_seed(7, -1, "a", 0), episode_seed(7, -1, "b", 0)]
    # Seeds depend on the run seed and the question id only: not on the question's place in the set.
    assert [r.seed for r in eval_requests(qs[::-1], p)] == [reqs[1].seed, reqs[0].seed]


def test_summary_lies_beside_the_results(tmp_path):
    assert summary_path_for(tmp_path / "r.jsonl") == tmp_path / "r.summary.json"
    assert summary_path_for(tmp_path / "r") == tmp_path / "r.summary.json"


def test_demo_config_loads():
    assert load_config(DEMO_CONFIG).name == "demo"


def flat(text: str) -> str:
    # The console wraps long lines: compare without white space.
    return "".join(text.split())


@pytest.fixture
def model_dir(tmp_path):
    """A folder that passes the CLI's model-folder check; nothing ever loads it in these tests."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{oops", "line 2: invalid JSON"),
        (json.dumps({"answer": "x"}), "line 2: field 'question' is missing or empty"),
        (
            json.dumps({"question": "q?", "answer": ["x"]}),
            "line 2: field 'answer' must be a string (or a number), got an array",
        ),
        (
            json.dumps({"question": "q?", "answer": "x", "aliases": "y"}),
            "line 2: field 'aliases' must be a list of strings",
        ),
    ],
)
def test_bad_question_file_stops_with_line_and_field(model_dir, tmp_path, capsys, line, expected):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "fine?", "answer": "yes"}) + "\n" + line + "\n")
    out = tmp_path / "r.jsonl"
    code = main(["eval", str(model_dir), "--data", str(data), "--output", str(out)])
    assert code == 2
    assert flat(f"error: {data}: {expected}") in flat(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "r.summary.json").exists()


def test_missing_question_file_and_model_folder(model_dir, tmp_path, capsys):
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in flat(capsys.readouterr().err)
    assert main(["eval", str(tmp_path)]) == 2
    assert flat("is not a model folder") in flat(capsys.readouterr().err)


def test_bad_override_stops_before_anything(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir), "pipeline.eval_temprature=0"])
    assert e.value.code == 2
    assert "pipeline.eval_temprature" in capsys.readouterr().err
