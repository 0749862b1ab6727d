"""`rapo run deploy/configs/smoke.yaml` end to end: every real component, a few steps (the shared smoke run)."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from rollout.weight_wire import SHM_DIR, SHM_PREFIX
from tests.e2e.conftest import SMOKE_EVAL_EVERY, SMOKE_STEPS, mlflow_run

pytestmark = pytest.mark.slow


def test_smoke_run_completes_and_cleans_up(smoke_run):
    out = smoke_run.out
    assert smoke_run.code == 0, smoke_run.output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = SMOKE_STEPS
    assert summary["status"] == "completed"
    assert summary["steps"] == steps
    assert summary["engine"] == "vllm" and summary["learner"] == "deepspeed"
    assert summary["weight_versions_published"] == steps  # one per step
    # Through vLLM's weight-transfer protocol (the gloo engine), one group for the one worker.
    assert summary["weights_transport"] == "gloo" and summary["weight_groups_formed"] == 1
    # The worker is on the learner's node: it maps each bucket from shared memory, and the
    # learner's files there went with it.
    assert summary["weight_receivers_joined"] == summary["weight_receivers_mapped"] == 1
    learner_pid = json.loads((out / "actors.json").read_text())["learner"][0]["pid"]
    assert not list(SHM_DIR.glob(f"{SHM_PREFIX}{learner_pid}-*"))
    assert summary["episodes"] == steps * 2 * 4  # questions_per_step x samples_per_question
    assert summary["accuracy_initial"] is not None and summary["accuracy_final"] is not None
    for key in ("zero_stage", "tool_calls_per_episode", "wall_time_s", "mode"):
        assert key in summary

    client, run = mlflow_run(out, summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["learner.zero_stage"] == str(summary["zero_stage"])
    for metric in ("reward/mean", "train/accuracy", "train/tool_calls_per_episode", "train/response_tokens",
                   "learner/loss", "learner/grad_norm", "learner/entropy",
                   "time/generate_s", "time/reward_s", "time/train_s", "time/weight_sync_s"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == list(range(1, steps + 1)), metric
    # Held-out evals: before training, every eval_every steps, and after the last step.
    evals = [0, *range(SMOKE_EVAL_EVERY, steps, SMOKE_EVAL_EVERY), steps]
    assert evals == [0, 5, 10, 12]  # periodic evals, and a final one that is not also periodic
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == evals
    assert sorted(f.name for f in (out / "eval").iterdir()) == [f"step-{s:04d}.jsonl" for s in evals]
    # The final policy is a model folder next to the run (what `rapo eval` loads).
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f.name for f in (out / "policy").iterdir()}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "reward_curve.png", "history.json"} <= artifacts

    # Everything the run started (Ray, Redis, vLLM, learners) is gone with it.
    assert smoke_run.gone
    redis_pid = int(re.search(r"redis: \S+ \(pid (\d+)", smoke_run.output).group(1))
    assert not _alive(redis_pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_misspelt_config_key_fails_before_anything_starts(rapo, tmp_path):
    p = rapo("run", "deploy/configs/smoke.yaml", "--output-dir", str(tmp_path / "run"), "learner.zero_stag=3")
    assert p.wait(timeout=60) == 2
    assert "learner.zero_stag" in p.output and "unknown key" in p.output
    assert not (tmp_path / "run").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_a_stopped_or_killed_run_leaves_no_warm_start_behind(rapo, tmp_path, how):
    """The policy is prepared in a child process; it must end with the run, even when only the
    CLI's own process is signalled (a supervisor, not a terminal's process group)."""
    p = rapo(
        "run", "deploy/configs/smoke.yaml", "--output-dir", str(tmp_path / "run"), "model.warm_start.steps=1000000"
    )
    p.wait_for_line("warm start:", timeout=300)
    kids = _children(p.proc.pid)
    assert kids and all(_alive(k) for k in kids)
    p.proc.send_signal(how)
    p.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(k) for k in kids), "the warm start outlived the run"
