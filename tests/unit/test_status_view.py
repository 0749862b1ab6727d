"""`rapo status`: the tables rendered from the controller's status dict, and `--json` passing it through."""

from __future__ import annotations

import json

from cluster.cli import _print_status, build_parser
from cluster.status_view import actor_rows, job_status_view, render_text, run_status_view

NODE = "3f2a9c1e" + "0" * 48
STATUS = {
    "phase": "train", "step": 7, "steps": 30, "version": 7, "mode": "async", "episodes": 56,
    "reward": 0.4375, "train_accuracy": 0.25, "eval_accuracy": None, "step_time_s": 12.345,
    "rollout_workers": 2, "running_groups": 3,
    "dashboard_url": "http://127.0.0.1:8265", "metrics_url": "http://127.0.0.1:44217/metrics",
    "actors": {
        "controller": {"name": "controller", "pid": 100, "node_id": NODE},
        "rollout": [
            {"name": "rollout-0", "ready": True, "draining": False, "in_flight": 2, "restarts": 1, "pid": 101,
             "node_id": NODE, "engine": "vllm"},
            {"name": "rollout-1", "ready": False, "draining": True, "in_flight": 0, "restarts": 0, "pid": 102,
             "node_id": NODE, "engine": "vllm"},
        ],
        "learner": [{"rank": 0, "node_id": NODE, "pid": 103, "gpu": False}],
        "judge": [{"name": "judge-0", "pid": 104, "node_id": NODE, "scored": 40},
                  {"name": "judge-1", "error": "ActorDiedError"}],
    },
}


def _line(text: str, *cells: str) -> str:
    """The one line of the rendered table holding all of ``cells``."""
    hits = [ln for ln in text.splitlines() if all(c in ln for c in cells)]
    assert len(hits) == 1, (cells, text)
    return hits[0]


def test_run_table_shows_progress_versions_and_urls():
    text = render_text(run_status_view(STATUS))
    _line(text, "phase", "train")
    _line(text, "step", "7/30")
    _line(text, "policy version", "7")
    _line(text, "reward (last step)", "0.438")
    _line(text, "eval accuracy", "-")  # no eval yet: a dash, not "None"
    _line(text, "step time", "12.3 s")
    _line(text, "dashboard", "http://127.0.0.1:8265")
    _line(text, "metrics", "http://127.0.0.1:44217/metrics")
    assert "None" not in text


def test_actor_table_has_one_row_per_actor_with_its_state():
    text = render_text(run_status_view(STATUS))
    _line(text, "controller", "alive", "100", "3f2a9c1e")
    _line(text, "rollout-0", "ready", "101", "vllm, in flight 2, restarts 1")
    _line(text, "rollout-1", "draining", "102")
    _line(text, "learner-0", "alive", "103", "cpu")
    _line(text, "judge-0", "alive", "104", "scored 40")
    _line(text, "judge-1", "unreachable (ActorDiedError)")
    assert NODE not in text  # node ids shortened to what tells nodes apart
    assert [r[1] for r in actor_rows(STATUS["actors"])] == [
        "controller", "rollout-0", "rollout-1", "learner-0", "judge-0", "judge-1"]


def test_a_starting_run_without_actors_renders():
    text = render_text(run_status_view({"phase": "starting", "step": 0, "steps": 3, "actors": {}}))
    _line(text, "phase", "starting")
    _line(text, "step", "0/3")
    _line(text, "rollout workers", "-")
    assert actor_rows({}) == []


def test_job_table():
    info = {"job_id": "raysubmit_abc", "status": "SUCCEEDED", "message": "Job finished successfully.",
            "entrypoint": "python -m cluster.cli run x.yaml", "start_time": 1_700_000_000_000, "end_time": None}
    text = render_text(job_status_view(info))
    _line(text, "job raysubmit_abc")
    _line(text, "status", "SUCCEEDED")
    _line(text, "started", "2023-11-14 22:13:20 UTC")
    _line(text, "ended", "-")


def test_json_prints_the_raw_status_unchanged(capsys):
    _print_status(STATUS, run_status_view, as_json=True)
    assert json.loads(capsys.readouterr().out) == STATUS


def test_table_is_the_default_and_json_an_option(capsys):
    assert build_parser().parse_args(["status"]).json is False
    assert build_parser().parse_args(["status", "--json"]).json is True
    _print_status(STATUS, run_status_view, as_json=False)
    out = capsys.readouterr().out
    _line(out, "rollout-0", "ready")
    assert not out.lstrip().startswith("{")
