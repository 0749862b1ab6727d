"""Fault tolerance of an asynchronous run: real processes are killed while it trains.

One run (module fixture) goes through four faults in turn: a rollout worker killed mid-episode,
a reward actor killed, the learner killed after a checkpoint, and the Redis server restarted
on its AOF. Each test then checks its part of the outcome; all of them that nothing was lost.
(Resubmission of a killed reward actor's in-flight work through a slow HTTP judge is covered
by tests/integration/test_reward_pool.py: the tiny model here rarely gives an answer to judge.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rollout.weight_wire import SHM_DIR, SHM_PREFIX
from tests.e2e.conftest import RapoProcess, mlflow_run

pytestmark = pytest.mark.slow
STEPS = 8


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wait_for_step(run: Path, proc: RapoProcess, step: int, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _read(run / "status.json")
        if status.get("step", 0) >= step:
            return status
        assert proc.proc.poll() is None, f"the run ended early:\n{proc.output[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "run"
    events: dict[str, object] = {}
    restarted_redis = None
    proc = RapoProcess([
        "run", "deploy/configs/smoke.yaml", "--output-dir", str(run), "pipeline.mode=async", "pipeline.max_staleness=1",
        f"pipeline.steps={STEPS}", "learner.checkpoint_every=2",
    ])
    try:
        _wait_for_step(run, proc, 1)
        actors = _read(run / "actors.json")
        events["rollout_pid"] = actors["rollout"][0]["pid"]
        _kill(events["rollout_pid"])

        _wait_for_step(run, proc, 3)
        events["judge_pid"] = _read(run / "actors.json")["judge"][0]["pid"]
        _kill(events["judge_pid"])

        _wait_for_step(run, proc, 5)  # a checkpoint was written at step 4
        events["learner_pid"] = _read(run / "actors.json")["learner"][0]["pid"]
        _kill(events["learner_pid"])

        _wait_for_step(run, proc, 6)
        log = proc.output
        redis_pid = int(re.search(r"redis: \S+ \(pid (\d+)", log).group(1)) if "redis:" in log else None
        if redis_pid is None:  # the first lines were not read yet: read the log so far
            proc.wait_for_line("redis:", 5)
            redis_pid = int(re.search(r"redis: \S+ \(pid (\d+)", proc.output).group(1))
        os.kill(redis_pid, signal.SIGTERM)  # Redis flushes its AOF and exits
        while (
            os.path.exists(f"/proc/{redis_pid}") and "Z" not in Path(f"/proc/{redis_pid}/stat").read_text().split()[2]
        ):
            time.sleep(0.05)
        time.sleep(1.0)  # the run now sees connection errors
        restarted_redis = subprocess.Popen(
            ["redis-server", str(run / "redis" / "redis.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        events["redis_restarted"] = True

        code = proc.wait(timeout=900)
        events["code"] = code
        events["output"] = proc.output
        events["summary"] = _read(run / "summary.json")
        events["history"] = {h["step"]: h for h in _read(run / "history.json").get("steps", [])}
        events["actors"] = _read(run / "actors.json")
        events["group_gone"] = proc.group_gone(timeout=60)
        # Shared-memory weight files of the killed learner (removed by its successor) and of the last one.
        events["shm_left"] = [p.name for pid in (events["learner_pid"], events["actors"]["learner"][0]["pid"])
                              for p in SHM_DIR.glob(f"{SHM_PREFIX}{pid}-*")]
        client, mlrun = mlflow_run(run, events["summary"]["mlflow_run_id"])
        events["staleness_mean"] = [m.step for m in client.get_metric_history(mlrun.info.run_id, "staleness/mean")]
        yield events
    except BaseException:
        print(proc.output[-6000:])
        print(subprocess.run(["ps", "-eo", "pid,ppid,cmd"], capture_output=True, text=True).stdout[-3000:])
        print((run / "actors.json").read_text() if (run / "actors.json").exists() else "no actors.json")
        raise
    finally:
        proc.kill()
        if restarted_redis is not None:
            os.killpg(restarted_redis.pid, signal.SIGTERM)
            restarted_redis.wait(30)


def test_run_completes_with_nothing_lost(faulty_run):
    s = faulty_run["summary"]
    assert faulty_run["code"] == 0, faulty_run["output"][-4000:]
    assert s["status"] == "completed" and s["steps"] == STEPS
    assert s["lost_episodes"] == 0
    assert sorted(faulty_run["history"]) == list(range(1, STEPS + 1))
    # Async: every group's lag when it reached the learner is in the histogram, and in MLflow every
    # step (steps re-trained after the learner restart are logged again).
    assert sum(s["staleness_histogram"].values()) >= STEPS * 2
    assert set(faulty_run["staleness_mean"]) == set(range(1, STEPS + 1))
    assert faulty_run["group_gone"], "processes of the run are still alive"


def test_killed_rollout_worker_is_restarted_and_its_episodes_rerun(faulty_run):
    s = faulty_run["summary"]
    assert s["restarts"]["rollout_workers"] >= 1
    assert s["rerun_groups"] >= 1  # the groups it was running were run again, not lost


def test_killed_reward_actor_is_restarted(faulty_run):
    judge0 = next(j for j in faulty_run["actors"]["judge"] if j["name"] == "judge-0")
    assert judge0["pid"] != faulty_run["judge_pid"]  # Ray restarted it; the pool kept scoring
    assert judge0["scored"] > 0  # and the restarted actor took work again


def test_killed_learner_resumes_from_the_last_checkpoint(faulty_run):
    s = faulty_run["summary"]
    assert s["restarts"]["learner"] >= 1
    # Versions never go back: the restored weights went out as a new version.
    assert s["weight_versions_published"] > STEPS
    # The killed learner could not remove its shared-memory weight files; its successor did.
    assert faulty_run["shm_left"] == []


def test_redis_restart_keeps_queue_and_state(faulty_run):
    assert faulty_run["redis_restarted"]
    s = faulty_run["summary"]
    assert s["lost_episodes"] == 0 and s["steps"] == STEPS
