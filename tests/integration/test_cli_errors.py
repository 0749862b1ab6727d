"""`rapo run`, `eval` and `init-model` on bad files and values: one line naming what to fix, exit 2, no traceback.

Every case here stops before Ray, an engine or a model starts, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main

SMOKE = "deploy/configs/smoke.yaml"
GOOD_ROW = json.dumps({"id": "a", "question": "Capital of Veltria?", "answer": "Osk"})


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPO_CACHE_DIR", str(tmp_path / "cache"))


def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    out["latin1"] = tmp_path / "latin1.jsonl"
    cafe = json.dumps({"question": "Café?", "answer": "x"}, ensure_ascii=False)
    out["latin1"].write_bytes((GOOD_ROW + "\n" + cafe).encode("latin-1"))
    out["the"] = tmp_path / "the.jsonl"
    out["the"].write_text(GOOD_ROW + "\n" + json.dumps({"question": "Which?", "answer": "The"}) + "\n")
    out["deep"] = tmp_path / "deep.jsonl"
    out["deep"].write_text('{"question": "q", "answer": "x", "m": ' + "[" * 100000 + "]" * 100000 + "}\n")
    out["dir"] = tmp_path / "folder.jsonl"
    out["dir"].mkdir()
    out["corpus"] = tmp_path / "corpus.jsonl"
    page = {"url": "https://a.example/1", "title": "t", "text": "Osk is the capital of Veltria."}
    out["corpus"].write_text(json.dumps(page) + "\n")
    out["dup_yaml"] = tmp_path / "dup.yaml"
    out["dup_yaml"].write_text(Path(SMOKE).read_text() + "\nlearner:\n  lr: 1.0e-5\n")
    out["latin1_yaml"] = tmp_path / "latin1.yaml"
    out["latin1_yaml"].write_bytes(Path(SMOKE).read_bytes() + "\n# réglages\n".encode("latin-1"))
    return out


def run_cli(capsys, argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, " ".join(err.split())


CASES = [
    # (name, argv after the command and config, what the message must say)
    ("lr inf", ["learner.lr=.inf"], "learner.lr"),
    ("temperature inf", ["rollout.temperature=.inf"], "rollout.temperature"),
    ("override too deep", ["rollout.max_model_len.x=1"], "rollout.max_model_len is a value, not a section"),
    ("metadata host", ["tools.web.allow_hosts=['169.254.169.254']"], "tools.web.allow_hosts"),
    ("model path nowhere", ["model.path=/nonexistent/model"], "model.path: /nonexistent/model does not exist"),
    ("data not utf-8", ["data.path={latin1}", "tools.corpus_path={corpus}"], "{latin1}: line 2: not UTF-8"),
    ("data a directory", ["data.path={dir}", "tools.corpus_path={corpus}"], "data.path: {dir} is not a file"),
    ("gold normalises to nothing", ["data.path={the}", "tools.corpus_path={corpus}"],
     "{the}: line 2: field 'answer' 'The'"),
    ("deep row", ["data.path={deep}", "tools.corpus_path={corpus}"], "{deep}: line 1: invalid JSON (nested deeper"),
]


@pytest.mark.parametrize("command", ["run", "init-model"])
@pytest.mark.parametrize(("name", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_values_and_files_exit_2_naming_them(tmp_path, capsys, command, name, overrides, expected):
    f = files(tmp_path)
    if command == "init-model" and "data.path" in overrides[0]:
        pytest.skip("init-model reads no question files")
    argv = [command, SMOKE, *(o.format(**f) for o in overrides)]
    if command == "run":
        argv += ["--output-dir", str(tmp_path / "out")]
    code, err = run_cli(capsys, argv)
    assert code == 2, err
    assert expected.format(**f) in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "expected"), [("dup_yaml", "key 'learner' appears twice"),
                                                  ("latin1_yaml", "not UTF-8"), ("dir", "is a directory")])
@pytest.mark.parametrize("command", ["run", "init-model"])
def test_bad_config_files_exit_2_naming_the_line(tmp_path, capsys, command, config, expected):
    f = files(tmp_path)
    code, err = run_cli(capsys, [command, str(f[config])])
    assert code == 2 and "Traceback" not in err
    assert str(f[config]) in err and (expected in err or config != "dup_yaml")


@pytest.mark.parametrize("data", ["latin1", "the", "deep", "dir"])
def test_eval_on_bad_question_files_exits_2_naming_the_line(tiny_model_dir, tmp_path, capsys, data):
    f = files(tmp_path)
    code, err = run_cli(capsys, ["eval", str(tiny_model_dir), "--config", SMOKE, "--data", str(f[data]),
                                 "--output", str(tmp_path / "r.jsonl"), "rollout.engine=simulated"])
    assert code == 2 and "Traceback" not in err
    assert str(f[data]) in err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize(("override", "field"),
                         [("learner.lr=.inf", "learner.lr"), ("rollout.temperature=.nan", "rollout.temperature")])
def test_eval_on_bad_values_exits_2_naming_the_field(tiny_model_dir, tmp_path, capsys, override, field):
    code, err = run_cli(capsys, ["eval", str(tiny_model_dir), "--config", SMOKE, override])
    assert code == 2 and field in err and "Traceback" not in err


def test_an_internal_error_prints_a_short_message_and_where_the_traceback_is(tmp_path, capsys, monkeypatch):
    import cluster.model_prep

    def broken(cfg, log=print):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cluster.model_prep, "ensure_policy", broken)
    code, err = run_cli(capsys, ["init-model", SMOKE])
    assert code == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: something inside broke" in err
    path = Path(err.split("the full traceback is in ")[1].split()[0])
    assert path.parent == tmp_path / "cache" / "errors"
    assert "Traceback" in path.read_text() and "something inside broke" in path.read_text()
