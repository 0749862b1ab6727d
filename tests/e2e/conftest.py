"""Run the real `rapo` CLI as a subprocess in its own process group, and clean up after it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
# SmolLM2 warm-started as deploy/configs/demo.yaml does (one cache entry, built once per machine):
# smoke.yaml's random-init model never calls a tool nor answers, so tests that need real
# episodes (tool calls, answers to judge, episodes that differ) run this policy on smoke.yaml, with
# the demo's episode length (4 tool calls at most) and learner settings for CPUs (padded micro-batches
# of 2, no activation checkpointing; smoke.yaml packs, for its tiny model, the path GPUs take).
SMOLLM2_POLICY = ["model.source=smollm2", "model.warm_start.steps=5", "model.warm_start.hops=[1,2]",
                  "data.demo.countries=120", "learner.kl_coef=0", "rollout.max_tool_calls=4",
                  "learner.packing=auto", "learner.micro_batch_size=2", "learner.gradient_checkpointing=false"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies (exited, not yet reaped; PID 1 here does not reap) count as gone.
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_ray_node(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop a throw-away `ray start --block` node through its process group.

    `ray start --block` takes about 30 s to act on SIGTERM; the node holds nothing a test keeps
    (its folders are removed after), so a short grace and then SIGKILL for the whole group.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def rapo_cli(*args: str, timeout: float = 300, expect: int = 0) -> str:
    """A short `rapo` command (scale, status, stop) against a live run, its exit code asserted: its
    stdout when it succeeds, its stderr (where errors go) when it is expected to fail."""
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == expect, (done.returncode, done.stderr[-3000:])
    return done.stdout if expect == 0 else done.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class RapoProcess:
    """The CLI in its own process group, its output in a file (a pipe nobody reads would block it)."""

    def __init__(self, args: list[str], env: dict | None = None):
        full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
        if args[0] == "run" and not any(a.startswith(("ray.address=", "ray.dashboard_port=")) for a in args):
            # A private Ray's dashboard on a port of its own: runs of other test workers start at the
            # same time, and two of them that both find 8265 free would both take it.
            args = [*args, f"ray.dashboard_port={free_port()}"]
        # Open for the whole life of the child, closed (and removed) by the rapo fixture.
        self.log = tempfile.NamedTemporaryFile(prefix="rapo-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=full_env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored across exec:
            # the CLI must get Ctrl-C as a terminal would send it.
            preexec_fn=_default_sigint,
        )
        self.pgid = self.proc.pid

    @property
    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise AssertionError(f"rapo did not finish within {timeout} s:\n{self.output[-4000:]}") from None

    def wait_for_line(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not printed within {timeout} s:\n{self.output[-4000:]}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)

    def group_gone(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not group_alive(self.pgid):
                return True
            time.sleep(0.5)
        return False


@pytest.fixture
def rapo():
    started: list[RapoProcess] = []

    def start(*args: str, env: dict | None = None) -> RapoProcess:
        p = RapoProcess(list(args), env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        os.unlink(p.log.name)


def mlflow_run(output_dir: Path, run_id: str):
    """The MLflow client of a run folder's sqlite store, and the run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    return client, client.get_run(run_id)


# The shared smoke run: long enough to watch live (dashboard, metrics endpoint, two policy versions
# after the first metrics), with periodic evals that are not also the final one.
SMOKE_STEPS, SMOKE_EVAL_EVERY = 12, 5
# Its learner as test_resume interrupts and resumes one: two ranks of sharded (ZeRO-3) state,
# checkpointed every 2 steps. The smoke run is test_resume's uninterrupted run.
SMOKE_LEARNER = ["learner.num_ranks=2", "learner.zero_stage=3", "learner.checkpoint_every=2"]


@dataclass
class FinishedRun:
    out: Path  # the run folder
    code: int  # the CLI's exit code
    output: str  # what the CLI printed
    gone: bool  # every process it started ended within 60 s of its exit
    live: dict  # what was seen while it ran (tests/e2e/live_run.py: observe)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Iterator[FinishedRun]:
    """One `rapo run deploy/configs/smoke.yaml` shared by the tests that only read what it showed while it
    ran and what it left (test_smoke_run, test_dashboard_metrics, and test_resume's uninterrupted run):
    one start-up and one run instead of three."""
    from tests.e2e.live_run import METRICS_ENV, observe

    out = tmp_path_factory.mktemp("smoke") / "run"
    p = RapoProcess(["run", "deploy/configs/smoke.yaml", "--output-dir", str(out), f"pipeline.steps={SMOKE_STEPS}",
                     f"pipeline.eval_every={SMOKE_EVAL_EVERY}", *SMOKE_LEARNER], env=METRICS_ENV)
    try:
        live = observe(out, p, SMOKE_STEPS)
        code = p.wait(timeout=900)
        yield FinishedRun(out=out, code=code, output=p.output, gone=p.group_gone(timeout=30), live=live)
    finally:
        p.kill()
        os.unlink(p.log.name)


@dataclass
class JudgedRun(FinishedRun):
    key: str  # the judge's API key (in the environment of the run only)
    key_env: str  # the variable it is read from
    ray_tmp: Path  # the run's own Ray session folder (searched for secrets)
    server: object  # the OpenAI test server, still serving (`rapo eval` of the run judges through it)
    chat: list  # the chat requests the run made (recorded when the run ended)
    faults: dict  # what the server injected into them, by kind


@pytest.fixture(scope="session")
def judged_run(tmp_path_factory) -> Iterator[JudgedRun]:
    """One SmolLM2 run at reward stage 2 through an LLM judge behind a real HTTP server, shared by
    test_llm_judge_run (the judge path, secrets) and test_eval (`rapo eval` of its policy, judged
    through the same server): one start-up and one run instead of two."""
    import secrets
    import shutil

    from tests.e2e import test_llm_judge_run as spec
    from tests.servers.openai_server import MALFORMED, OpenAITestServer

    key = f"sk-rapo-e2e-{secrets.token_hex(16)}"
    out = tmp_path_factory.mktemp("judged") / "run"
    # Ray's session folder (logs of every worker, raylet, GCS, dashboard) for this run only, so
    # that it can be searched too. Short: Ray's unix socket paths live under it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    server = OpenAITestServer(
        api_key=key, latency_s=spec.LATENCY_S, first_request_faults=[MALFORMED] * spec.PLANNED_FAILURES,
        # Then at random: HTTP 429/500, prose or broken JSON, a wrong number of labels.
        error_rate=0.15, malformed_rate=0.1, wrong_count_rate=0.1, seed=7,
    )
    p = None
    try:
        with server as srv:
            p = RapoProcess([
                "run", "deploy/configs/smoke.yaml", "--output-dir", str(out),
                f"pipeline.steps={spec.STEPS}", f"pipeline.samples_per_question={spec.SAMPLES}", *SMOLLM2_POLICY,
                "rewards.stage=2", "pipeline.eval_at_start=false",
                f"rewards.num_actors={spec.ACTORS}", f"rewards.max_in_flight_per_actor={spec.PER_ACTOR}",
                f"rewards.judge.base_url={srv.base_url}", f"rewards.judge.model={srv.model}",
                f"rewards.judge.api_key_env={spec.KEY_ENV}", f"rewards.judge.max_retries={spec.MAX_RETRIES}",
                "rewards.judge.timeout_s=10", "rewards.judge.backoff_base_s=0.02", "rewards.judge.backoff_max_s=0.1",
            ], env={spec.KEY_ENV: key, "RAY_TMPDIR": str(ray_tmp)})
            code = p.wait(timeout=1200)
            gone = p.group_gone(timeout=30)
            chat = [r for r in srv.requests if r.path.endswith("/chat/completions")]
            yield JudgedRun(out=out, code=code, output=p.output, gone=gone, live={}, key=key, key_env=spec.KEY_ENV,
                            ray_tmp=ray_tmp, server=srv, chat=chat, faults=dict(srv.count_by_fault()))
    finally:
        if p is not None:
            p.kill()
            os.unlink(p.log.name)
        shutil.rmtree(ray_tmp, ignore_errors=True)
