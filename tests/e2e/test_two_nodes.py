"""Two real Ray nodes on one machine: the learner on one, rollout workers on the other.

The weights cross between the nodes through vLLM's weight-transfer protocol (the project's gloo
engine); after each push the engine's behaviour logprobs equal the learner's. `rapo scale` adds a
worker on the second node that starts at the current version, `rapo status` shows it, and a
scale-down drains it while the learner trains on; a run that is finishing refuses to scale.
(Scaling has no separate single-node run: an operator scales across nodes, and one run start-up
fewer is minutes off the suite.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.redis_server import free_port
from tests.e2e.conftest import rapo_cli, stop_ray_node
from tests.e2e.test_fault_tolerance import _read, _wait_for_step

pytestmark = pytest.mark.slow
# An upper bound only: the test ends the run with `rapo stop` once the added worker has trained a
# step, so the run never ends while the scale-up (a vLLM start-up) is still going on.
STEPS = 400


def _ray_node(args: list[str], temp: Path) -> subprocess.Popen:
    # Each node's agents on ports of their own: two raylets share this machine's address.
    ray_bin = Path(sys.executable).with_name("ray")
    return subprocess.Popen(
        [str(ray_bin), "start", "--block", "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", *args],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture
def two_nodes():
    gcs = free_port()
    temp = Path("/tmp") / f"rapo-2n-{os.getpid()}-{gcs}"  # Ray caps socket path lengths
    # Without a port of its own the head's dashboard process fights other Rays for 8265 and the node times out.
    head = _ray_node(["--head", f"--port={gcs}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                      '--resources={"rapo_learner_node": 1}'], temp)
    nodes = [head]
    try:
        address = f"127.0.0.1:{gcs}"
        _wait_for_nodes(address, 1)
        nodes.append(_ray_node([f"--address={address}",
                                '--resources={"rapo_rollout_node": 4}'], temp))
        _wait_for_nodes(address, 2)
        yield address
    finally:
        for proc in reversed(nodes):
            stop_ray_node(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, timeout: float = 300) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([str(ray_bin), "status", f"--address={address}"], capture_output=True, text=True,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if out.returncode == 0 and out.stdout.count("node_") >= n:
            return
        time.sleep(2)
    raise AssertionError(f"{n} Ray nodes did not come up at {address}")


def _scale(address: str, n: int) -> dict:
    out = rapo_cli("scale", "--rollout-workers", str(n), "--address", address, timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def _wait_for_workers(run: Path, address: str, names: list[str], timeout: float = 300) -> dict:
    """The live run's own view (`rapo status --json`) once its rollout workers are exactly `names`.

    Waits on actors.json, which the controller rewrites every step: a `rapo status` a second is
    a Python start and a Ray client each time, which takes most of a core from the run it watches.
    """
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = [w["name"] for w in _read(run / "actors.json").get("rollout", [])]
        if seen == names:
            return json.loads(rapo_cli("status", "--json", "--address", address))
        time.sleep(1)
    raise AssertionError(f"rollout workers never became {names}: {seen}")


def test_learner_and_rollout_on_two_nodes_scaled_up_and_down(two_nodes, rapo, tmp_path):
    run = tmp_path / "run"
    p = rapo("run", "deploy/configs/smoke.yaml", "--output-dir", str(run), f"pipeline.steps={STEPS}",
             f"ray.address={two_nodes}", "learner.resources={rapo_learner_node: 1}",
             "rollout.resources={rapo_rollout_node: 1}", "learner.autocast_bf16=false", "pipeline.eval_every=0",
             "data.eval_size=2")
    _wait_for_step(run, p, 1)
    up = _scale(two_nodes, 2)
    assert up["added"] == ["rollout-1"] and up["workers"] == 2
    # Caught up before taking work: the version every worker holds is the current one.
    assert up["versions"]["rollout-1"] == up["current_version"] >= 1
    # One more push through the group re-formed with both workers.
    status = _wait_for_step(run, p, up["current_version"] + 1)
    assert status["rollout_workers"] == 2
    names = sorted(a["name"] for a in _read(run / "actors.json")["rollout"])
    assert names == ["rollout-0", "rollout-1"]
    # `rapo status` shows both workers (--json: the controller's own status and actors; else a table).
    live = json.loads(rapo_cli("status", "--json", "--address", two_nodes))
    assert [w["name"] for w in live["actors"]["rollout"]] == names and live["rollout_workers"] == 2
    assert live["step"] >= status["step"] and live["phase"]
    table = rapo_cli("status", "--address", two_nodes).splitlines()
    assert all(any(name in ln and "ready" in ln for ln in table) for name in names), table

    down = _scale(two_nodes, 1)
    assert down["draining"] == ["rollout-1"]
    # The drained worker finishes its groups, then leaves; the run trains on without it.
    gone = _wait_for_workers(run, two_nodes, ["rollout-0"])
    assert [w["name"] for w in gone["actors"]["rollout"]] == ["rollout-0"] and gone["rollout_workers"] == 1
    _wait_for_step(run, p, gone["step"] + 1)
    rapo_cli("stop", "--address", two_nodes)
    # A run that is finishing says so, instead of failing a worker's weight sync.
    refused = rapo_cli("scale", "--rollout-workers", "2", "--address", two_nodes, expect=2)
    assert "the run is finishing" in refused and "Traceback" not in refused, refused
    assert p.wait(timeout=900) == 0, p.output[-4000:]

    summary = json.loads((run / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["status"] == "stopped" and gone["step"] < steps < STEPS
    assert summary["lost_episodes"] == 0 and summary["rollout_workers"] == 1
    # The learner kept stepping throughout: one version per step, no restart.
    assert summary["weight_versions_published"] == steps and summary["restarts"]["learner"] == 0
    assert summary["weights_transport"] == "gloo"
    assert summary["weight_groups_formed"] >= 3  # rollout-0; again with rollout-1; again without it
    # On another Ray node than the learner: every bucket came through the gloo broadcast, none was
    # mapped (although the two nodes share this machine's /dev/shm).
    assert summary["weight_receivers_mapped"] == 0
    assert summary["weight_receivers_joined"] >= summary["weight_groups_formed"]
    actors = _read(run / "actors.json")
    learner_node = actors["learner"][0]["node_id"]
    rollout_nodes = {a["node_id"] for a in actors["rollout"]}
    assert len(rollout_nodes) == 1 and learner_node not in rollout_nodes
    assert all(a["version"] == steps for a in actors["rollout"])
    # Sync mode: every step after the first trains on episodes of the version just pushed; the
    # learner recomputes their logprobs with its own weights, so the gap measures the push.
    history = json.loads((run / "history.json").read_text())["steps"]
    assert max(h["pipeline/rollout_workers"] for h in history) == 2
    gaps = [h["learner/prox_behaviour_abs_diff"] for h in history]
    assert len(gaps) == steps and max(gaps) < 1e-4, gaps
    assert p.group_gone(timeout=60)
