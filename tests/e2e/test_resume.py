"""Ctrl-C, checkpoint and resume: a run interrupted after its step-2 checkpoint, then resumed, draws and
trains what an uninterrupted run does, and the interrupted run took everything it started down with it.

The uninterrupted run is the shared smoke run (tests/e2e/conftest.py: smoke_run), whose learner is
configured as here (SMOKE_LEARNER): its first four steps are the reference."""

from __future__ import annotations

import json
import signal
import time

import pytest

from cluster.run_state import latest_tag
from tests.e2e.conftest import SMOKE_EVAL_EVERY, SMOKE_LEARNER, mlflow_run

pytestmark = pytest.mark.slow


def _history(run_dir):
    return {h["step"]: h for h in json.loads((run_dir / "history.json").read_text())["steps"]}


def _wait_for_checkpoint(p, checkpoints, tag: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while latest_tag(checkpoints) != tag:
        assert p.proc.poll() is None, f"the run ended before its {tag} checkpoint:\n{p.output[-3000:]}"
        assert time.monotonic() < deadline, f"no {tag} checkpoint within {timeout} s:\n{p.output[-3000:]}"
        time.sleep(0.1)


def test_a_run_interrupted_after_a_checkpoint_resumes_as_the_uninterrupted_one(smoke_run, rapo, tmp_path):
    whole, part = smoke_run.out, tmp_path / "part"
    assert smoke_run.code == 0, smoke_run.output[-3000:]
    # The smoke run's config, 4 steps (its first eval after step 0 comes after step 4).
    assert SMOKE_EVAL_EVERY > 4
    common = ["pipeline.steps=4", f"pipeline.eval_every={SMOKE_EVAL_EVERY}", *SMOKE_LEARNER]

    # SIGINT (Ctrl-C) to the CLI, once step 2's checkpoint is complete (`rapo_latest` moves last) and
    # before step 4's: the steps trained since are lost with the run, their groups are in Redis.
    b = rapo("run", "deploy/configs/smoke.yaml", "--output-dir", str(part), *common)
    _wait_for_checkpoint(b, part / "checkpoints", "step-000002", timeout=600)
    b.proc.send_signal(signal.SIGINT)
    assert b.wait(timeout=120) == 130, b.output[-3000:]
    assert b.group_gone(timeout=60), "processes of the interrupted run are still alive"
    assert latest_tag(part / "checkpoints") == "step-000002", "the run reached step 4 before the Ctrl-C"
    interrupted_mlflow_id = json.loads((part / "checkpoints" / "step-000002" / "controller.json").read_text())[
        "mlflow_run_id"]

    c = rapo("run", "deploy/configs/smoke.yaml", "--resume", str(part), *common)
    assert c.wait(timeout=900) == 0, c.output[-3000:]
    assert "resuming run" in c.output

    summary = json.loads((part / "summary.json").read_text())
    # One per step: the resumed run pushes the checkpoint's weights again under their version 2.
    assert summary["steps"] == 4 and summary["weight_versions_published"] == 4
    assert summary["dropped_stale_groups"] == 0 and summary["lost_episodes"] == 0
    assert summary["episodes"] == 4 * 2 * 4 and summary["learner_ranks"] == 2

    ha, hb = _history(whole), _history(part)
    assert sorted(hb) == [1, 2, 3, 4]
    # No question lost or repeated: the resumed run drew exactly what the uninterrupted one drew.
    assert [ha[s]["questions"] for s in range(1, 5)] == [hb[s]["questions"] for s in range(1, 5)]
    for step in (3, 4):
        for key in ("train/response_tokens", "train/episode_tokens", "learner/entropy", "reward/mean"):
            assert hb[step][key] == pytest.approx(ha[step][key], rel=0.05, abs=1e-6), (step, key)
    # The resumed run continued the interrupted run's MLflow run, the only one in its store.
    assert summary["mlflow_run_id"] == interrupted_mlflow_id
    client, run = mlflow_run(part, interrupted_mlflow_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [interrupted_mlflow_id]
