"""Ray Jobs: submit `rapo run` to a cluster's dashboard address, follow it, stop it.

The job's runtime_env uploads this repository as the working directory (minus virtualenvs and
run folders) so the cluster runs exactly this code; secrets never go into it: the cluster gets
them from Kubernetes Secrets or files (deploy/kuberay/).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", ".whl"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def entrypoint(config: str, overrides: list[str], output_dir: str | None = None) -> str:
    """`rapo run` on the cluster; it joins the cluster (ray.address=auto) instead of starting a Ray."""
    args = ["python", "-m", "cluster.cli", "run", config]
    if output_dir:
        args += ["--output-dir", output_dir]
    if not any(o.startswith("ray.address=") for o in overrides):
        overrides = [*overrides, "ray.address=auto"]
    return shlex.join(args + list(overrides))


def runtime_env(pip: list[str] | None = None, env_vars: dict[str, str] | None = None) -> dict:
    env = {"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES}
    if pip:
        env["pip"] = pip
    if env_vars:
        env["env_vars"] = env_vars
    return env


# A head whose job agent has not registered yet refuses jobs with this (HTTP 500), and Ray says to try
# again later: a freshly started cluster, or a head node whose cores are busy.
NO_AGENT_YET = "No available agent to submit job"


def submit_when_ready(job_client, wait_s: float = 90.0, poll_s: float = 2.0, log=None, **job) -> str:
    """`job_client.submit_job(**job)`, tried again while the head has no job agent yet (up to `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return job_client.submit_job(**job)
        except RuntimeError as e:
            if NO_AGENT_YET not in str(e) or time.monotonic() + poll_s > deadline:
                raise
            if log is not None:
                log(f"the cluster's job agent is not up yet; trying again for up to {wait_s:.0f} s")
                log = None
            time.sleep(poll_s)


def submit(
    address: str,
    config: str,
    overrides: list[str],
    *,
    output_dir: str | None = None,
    pip: list[str] | None = None,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    log=None,
) -> str:
    return submit_when_ready(
        client(address),
        log=log,
        entrypoint=entrypoint(config, overrides, output_dir),
        runtime_env=runtime_env(pip, env_vars),
        submission_id=submission_id,
    )


def job_status(address: str, job_id: str) -> dict:
    info = client(address).get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def follow(address: str, job_id: str, write, poll_s: float = 2.0) -> str:
    """Stream the job's logs through ``write`` until it ends; returns its final status."""

    async def tail():
        async for chunk in client(address).tail_job_logs(job_id):
            write(chunk)

    with contextlib.suppress(Exception):  # the log stream closes when the job ends; the status below is what counts
        asyncio.run(tail())
    while (status := job_status(address, job_id)["status"]) not in TERMINAL:
        time.sleep(poll_s)
    return status


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
