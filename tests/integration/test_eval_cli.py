"""`rapo eval` in-process on the simulated engine (no vLLM, no Ray): files, numbers, and the LLM judge over HTTP.

The simulated engine searches a seeded number of times, then answers \\boxed{unknown}; so a
question whose gold answer is "unknown" is judged correct, any other incorrect.
"""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from tests.servers.openai_server import OpenAITestServer

FAST = [
    "rollout.engine=simulated",
    "rollout.latency_model.per_token_s=0",
    "rollout.latency_model.prefill_per_token_s=0",
]
KEY = "sk-rapo-eval-test-0123456789"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {"id": "u1", "question": "What is the colour of nothing?", "answer": "Unknown"},
        {"question": "Capital of Veltria?", "answer": "Osk", "aliases": ["Osk City"]},
        {"id": 3, "question": "Who knows?", "answer": "nobody", "aliases": ["unknown"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_heldout_set_by_default(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "held.jsonl"
    assert (
        main(["eval", str(tiny_model_dir), "--config", "deploy/configs/smoke.yaml", "--output", str(out), *FAST]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "held.summary.json").read_text())
    rows = read_jsonl(out)
    assert summary["questions"] == len(rows) == 8  # smoke.yaml: data.eval_size=8
    assert summary["data"] == "heldout" and summary["judge"] == "rule" and summary["accuracy"] == 0.0
    assert summary["tool_calls_per_question"] == pytest.approx(sum(r["tool_calls"] for r in rows) / 8)
    assert summary["tool_calls_per_question"] > 0
    assert summary["response_tokens_per_question"] == pytest.approx(sum(r["response_tokens"] for r in rows) / 8)
    # Episodes that reach rollout.max_tool_calls end without an answer.
    assert all(r["answer"] == ("unknown" if r["finish_reason"] == "answered" else None) for r in rows)
    assert all(r["correct"] is False and r["gold"] and r["question"] for r in rows)


def test_question_file_with_rule_judge(tiny_model_dir, questions, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert (
        main(
            [
                "eval",
                str(tiny_model_dir),
                "--config",
                "deploy/configs/smoke.yaml",
                "--data",
                str(questions),
                "--output",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    rows = read_jsonl(out)
    assert [(r["id"], r["gold"], r["aliases"], r["correct"]) for r in rows] == [
        ("u1", "Unknown", [], True),
        ("line-2", "Osk", ["Osk City"], False),
        ("3", "nobody", ["unknown"], True),
    ]
    assert summary["questions"] == 3 and summary["correct"] == 2 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["data"] == str(questions)
    assert summary["judge_report"]["judge/source_rule"] == 3


def test_llm_judge_when_configured(tiny_model_dir, questions, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAPO_JUDGE_API_KEY", KEY)
    out = tmp_path / "r.jsonl"
    with OpenAITestServer(api_key=KEY) as srv:
        judge = [f"rewards.judge.base_url={srv.base_url}", f"rewards.judge.model={srv.model}"]
        assert (
            main(
                [
                    "eval",
                    str(tiny_model_dir),
                    "--config",
                    "deploy/configs/smoke.yaml",
                    "--data",
                    str(questions),
                    "--output",
                    str(out),
                    *FAST,
                    *judge,
                ]
            )
            == 0
        )
        asked = [r for r in srv.requests if r.path.endswith("/chat/completions")]
    summary = json.loads(capsys.readouterr().out)
    assert len(asked) == 3 and all(r.authorized for r in asked)
    assert summary["judge"] == f"llm {srv.model} at {srv.base_url}"
    assert summary["judge_report"]["judge/source_llm"] == 3 and summary["judge_report"]["judge/fallbacks"] == 0
    # The test server judges by the rules: the same verdicts as the rule judge.
    assert [r["correct"] for r in read_jsonl(out)] == [True, False, True]


def test_llm_judge_without_its_key_stops_before_the_engine(tiny_model_dir, questions, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAPO_JUDGE_API_KEY", raising=False)
    code = main(
        [
            "eval",
            str(tiny_model_dir),
            "--config",
            "deploy/configs/smoke.yaml",
            "--data",
            str(questions),
            "--output",
            str(tmp_path / "r.jsonl"),
            *FAST,
            "rewards.judge.base_url=http://127.0.0.1:9/v1",
        ]
    )
    assert code == 2
    assert "no judge API key" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "r.jsonl").exists()
