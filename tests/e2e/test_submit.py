"""`rapo submit` against a real `ray start --head` cluster started (and stopped) by the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import jobs
from cluster.redis_server import free_port
from tests.e2e.conftest import REPO, stop_ray_node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    """One head for the module's jobs, as a cluster serves many: a head start each would be most of
    the module's time."""
    gcs, dash = free_port(), free_port()
    temp = Path("/tmp") / f"rapo-head-{os.getpid()}-{gcs}"  # Ray caps socket path lengths
    # A job's entrypoint runs `python` from the head's PATH, as on a cluster image where the
    # project is installed: put this environment's interpreter first (CI does not activate it).
    ray_bin = Path(sys.executable).with_name("ray")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            # Every Ray node's dashboard agent takes 52365 unless told otherwise. While another test's
            # private Ray held it, this head's agent never came up and the head refused every job
            # ("No available agent to submit job").
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:  # a head that never got ready is stopped too
        _wait_until_it_takes_jobs(head, url)
        yield url
    finally:
        stop_ray_node(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_until_it_takes_jobs(head: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert head.poll() is None and time.monotonic() < deadline, "ray head did not start"
        time.sleep(1)
    # The dashboard answers before the head's job agent is up, and until then jobs are refused:
    # `rapo submit` waits for it, `ray job submit` does not. One no-op job first.
    probe_id = jobs.submit_when_ready(jobs.client(url), wait_s=120, entrypoint="true")
    while jobs.job_status(url, probe_id)["status"] not in jobs.TERMINAL:
        assert time.monotonic() < deadline + 120, "the ray head's first job did not finish"
        time.sleep(0.5)


def _rapo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )


def test_submit_wait_then_status(ray_head, tmp_path):
    out = tmp_path / "job-run"
    sub = _rapo(
        "submit",
        "deploy/configs/smoke.yaml",
        "pipeline.steps=2",
        "--address",
        ray_head,
        "--output-dir",
        str(out),
        "--wait",
        timeout=900,
    )
    assert sub.returncode == 0, sub.stderr[-4000:]
    job_id = sub.stdout.strip().splitlines()[0]
    status = _rapo("status", job_id, "--address", ray_head, "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    table = _rapo("status", job_id, "--address", ray_head, timeout=60)  # what an operator reads
    assert table.returncode == 0, table.stderr
    assert job_id in table.stdout and any("status" in ln and "SUCCEEDED" in ln for ln in table.stdout.splitlines())
    assert (
        info["status"] == "SUCCEEDED"
        and "cluster.cli run" in info["entrypoint"]
        and "ray.address=auto" in info["entrypoint"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    logs = _rapo("logs", job_id, "--address", ray_head, timeout=60)
    assert "mlflow run id" in logs.stdout


def test_bad_config_is_refused_before_submission(ray_head):
    sub = _rapo("submit", "deploy/configs/smoke.yaml", "learner.zero_stag=1", "--address", ray_head, timeout=60)
    assert sub.returncode == 2 and "learner.zero_stag" in sub.stderr


def test_ray_job_submit_runs_on_the_submitting_cluster(ray_head, tmp_path):
    """Ray's own CLI, no ray.address in the config: the job's `rapo run` must join this cluster
    (RAY_ADDRESS, set by Ray Jobs), not start a private Ray whose workers cannot fetch the job's files.
    Where the run goes is the point here, so its engine and learner are the simulated ones (their actors
    still load the job's files); test_submit_wait_then_status runs vLLM and DeepSpeed in a job."""
    from ray.util.state import list_actors

    from cluster.jobs import UPLOAD_EXCLUDES

    out = tmp_path / "ray-job-run"
    ray_bin = Path(sys.executable).with_name("ray")
    path = f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    before = {a.actor_id for a in list_actors(address=ray_head, limit=1000)}  # the head serves the module's jobs
    sub = subprocess.run(
        [
            str(ray_bin),
            "job",
            "submit",
            "--address",
            ray_head,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"excludes": UPLOAD_EXCLUDES}),
            "--",
            "python",
            "-m",
            "cluster.cli",
            "run",
            "deploy/configs/smoke.yaml",
            "pipeline.steps=1",
            "rollout.engine=simulated",
            "learner.backend=simulated",
            "learner.sim_step_s=0",
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]
    assert "joined the cluster" in sub.stdout and "(from RAY_ADDRESS)" in sub.stdout, sub.stdout[-4000:]
    assert "private local Ray" not in sub.stdout
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    names = {a.name for a in list_actors(address=ray_head, limit=1000) if a.actor_id not in before}
    assert {"learner-0", "rollout-0"} <= names, names
