"""Checkpoint and resume: a run stopped after step 2 and resumed continues exactly where it stopped."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _history(run_dir):
    return {h["step"]: h for h in json.loads((run_dir / "history.json").read_text())["steps"]}


def test_resumed_run_matches_the_uninterrupted_one(rapo, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ["learner.num_ranks=2", "learner.zero_stage=3"]
    a = rapo(
        "run",
        "deploy/configs/smoke.yaml",
        "--output-dir",
        str(whole),
        "pipeline.steps=4",
        "learner.checkpoint_every=2",
        *common,
    )
    assert a.wait(timeout=900) == 0, a.output[-3000:]
    b = rapo("run", "deploy/configs/smoke.yaml", "--output-dir", str(part), "pipeline.steps=2", *common)
    assert b.wait(timeout=900) == 0, b.output[-3000:]
    first_run_id = json.loads((part / "summary.json").read_text())["mlflow_run_id"]
    c = rapo("run", "deploy/configs/smoke.yaml", "--resume", str(part), "pipeline.steps=4", *common)
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
    # The resumed run continued the same MLflow run.
    assert summary["mlflow_run_id"] == first_run_id
