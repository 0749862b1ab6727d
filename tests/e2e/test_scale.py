"""`rapo scale`: rollout workers join and leave a live run; the learner never stops."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import rapo_cli
from tests.e2e.test_fault_tolerance import _read, _wait_for_step

pytestmark = pytest.mark.slow
# An upper bound only: the test ends the run with `rapo stop` once it has seen what it checks, so
# it never races the run's end (a scale-up is a vLLM start-up, whose time varies with the machine).
STEPS = 400


def _scale(n: int) -> dict:
    return json.loads(rapo_cli("scale", "--rollout-workers", str(n)).strip().splitlines()[-1])


def _wait_for_workers(run, names: list[str], timeout: float = 300) -> dict:
    """The live run's own view (`rapo status --json`) once its rollout workers are exactly `names`.

    Waits on actors.json, which the controller rewrites every step: a `rapo status` a second is
    a Python start and a Ray client each time, which took most of a core from the run it watched.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [w["name"] for w in _read(run / "actors.json").get("rollout", [])]
        if seen == names:
            return json.loads(rapo_cli("status", "--json"))
        time.sleep(1)
    raise AssertionError(f"rollout workers never became {names}: {seen}")


def test_scale_up_and_down_while_training(rapo, tmp_path):
    run = tmp_path / "run"
    p = rapo(
        "run", "deploy/configs/smoke.yaml", "--output-dir", str(run), "pipeline.mode=async", f"pipeline.steps={STEPS}"
    )
    _wait_for_step(run, p, 1)
    up = _scale(2)
    assert up["added"] == ["rollout-1"] and up["workers"] == 2
    # Added at the current version: nothing it generates predates the step it joined at.
    assert up["versions"]["rollout-1"] == up["current_version"] >= 1
    status = _wait_for_step(run, p, _read(run / "status.json")["step"] + 1)
    assert status["rollout_workers"] == 2
    names = sorted(a["name"] for a in _read(run / "actors.json")["rollout"])
    assert names == ["rollout-0", "rollout-1"]
    # `rapo status` shows both workers (--json: the controller's own status and actors).
    live = json.loads(rapo_cli("status", "--json"))
    assert [w["name"] for w in live["actors"]["rollout"]] == names and live["rollout_workers"] == 2
    assert live["step"] >= status["step"] and live["phase"]
    table = rapo_cli("status").splitlines()
    assert all(any(name in ln and "ready" in ln for ln in table) for name in names), table

    down = _scale(1)
    assert down["draining"] == ["rollout-1"]
    # The drained worker finishes its groups, then leaves; the run trains on without it.
    gone = _wait_for_workers(run, ["rollout-0"])
    assert [w["name"] for w in gone["actors"]["rollout"]] == ["rollout-0"] and gone["rollout_workers"] == 1
    _wait_for_step(run, p, gone["step"] + 1)
    rapo_cli("stop")
    # A run that is finishing says so, instead of failing a worker's weight sync.
    refused = rapo_cli("scale", "--rollout-workers", "2", expect=2)
    assert "the run is finishing" in refused and "Traceback" not in refused, refused
    assert p.wait(timeout=900) == 0, p.output[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and gone["step"] < summary["steps"] < STEPS
    assert summary["lost_episodes"] == 0 and summary["rollout_workers"] == 1
    history = json.loads((run / "history.json").read_text())["steps"]
    assert max(h["pipeline/rollout_workers"] for h in history) == 2
    # The learner kept stepping throughout: one version per step, no restart.
    assert summary["weight_versions_published"] == summary["steps"] and summary["restarts"]["learner"] == 0
    assert p.group_gone(timeout=60)
