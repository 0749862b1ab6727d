"""During a run, the Ray dashboard lists the run's named actors and Ray's metrics endpoint serves
rapo's custom metrics (cluster/ray_metrics.py), which deploy/grafana/rapo-dashboard.json charts.

Ray exports custom metrics in batches (every RAY_metrics_report_interval_ms, shortened here), so
both are polled until they show up or the run ends; nothing here depends on how fast a step is.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.test_fault_tolerance import _read

pytestmark = pytest.mark.slow
STEPS = 12
NAMES = ("controller", "rollout-0", "learner-0", "judge-0")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _loopback(url: str) -> str:
    """The same port on 127.0.0.1: the local cluster's endpoints listen there too (tests talk to nothing else)."""
    parts = urlsplit(url)
    return parts._replace(netloc=f"127.0.0.1:{parts.port}").geturl()


def _poll(what: str, proc, probe, timeout: float = 600):
    """probe() until it returns something truthy; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            got = probe()
        except (OSError, ValueError, KeyError) as e:  # not up yet
            got, last = None, e
        if got:
            return got
        assert proc.proc.poll() is None, f"the run ended before {what} (last error: {last}):\n{proc.output[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last})")


def _named_actors(dashboard: str) -> dict[str, str] | None:
    """name -> state of the run's named actors (the state API), once all of NAMES are ALIVE."""
    body = json.loads(_get(f"{dashboard}/api/v0/actors?limit=10000&detail=false"))
    actors = {a["name"]: a["state"] for a in body["data"]["result"]["result"] if a.get("name")}
    return actors if all(actors.get(n) == "ALIVE" for n in NAMES) else None


def _samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(samples, name: str, **labels: str) -> float | None:
    """Sum over the series of ``name`` whose labels include ``labels`` (None when there is none)."""
    hits = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
    return sum(hits) if hits else None


# name, labels, a check of the value: what one finished step and one evaluation leave on the endpoint.
EXPECTED = [
    ("ray_rapo_episodes_total", {}, lambda v: v >= 8),  # 2 questions x 4 samples per step
    ("ray_rapo_generated_tokens_total", {}, lambda v: v > 0),
    ("ray_rapo_reward", {}, lambda v: 0 <= v <= 1.1),
    ("ray_rapo_accuracy", {"split": "train"}, lambda v: 0 <= v <= 1),
    ("ray_rapo_accuracy", {"split": "eval"}, lambda v: 0 <= v <= 1),
    ("ray_rapo_policy_version", {}, lambda v: v >= 1),
    ("ray_rapo_staleness_count", {}, lambda v: v >= 2),
    ("ray_rapo_staleness_bucket", {"le": "+Inf"}, lambda v: v >= 2),
    ("ray_rapo_queue_depth", {"queue": "groups"}, lambda v: v >= 0),
    ("ray_rapo_queue_depth", {"queue": "running"}, lambda v: v >= 0),
    ("ray_rapo_judge_latency_seconds_count", {}, lambda v: v >= 8),
    ("ray_rapo_weight_sync_seconds_count", {}, lambda v: v >= 1),
    ("ray_rapo_step_seconds_count", {"phase": "train"}, lambda v: v >= 1),
    ("ray_rapo_step_seconds_count", {"phase": "eval"}, lambda v: v >= 1),
]


def _missing(samples) -> list[str]:
    missing = []
    for name, labels, ok in EXPECTED:
        v = _value(samples, name, **labels)
        if v is None or not ok(v):
            missing.append(f"{name}{labels or ''}={v}")
    return missing


def test_dashboard_lists_named_actors_and_metrics_endpoint_serves_custom_metrics(rapo, tmp_path):
    run = tmp_path / "run"
    p = rapo("run", "deploy/configs/smoke.yaml", "--output-dir", str(run), f"pipeline.steps={STEPS}",
             env={"RAY_metrics_report_interval_ms": "2000"})

    status = _poll("status.json with the dashboard and metrics URLs", p,
                   lambda: (s := _read(run / "status.json")).get("dashboard_url") and s.get("metrics_url") and s)
    dashboard, metrics_url = status["dashboard_url"].rstrip("/"), status["metrics_url"]
    assert urlsplit(dashboard).hostname == "127.0.0.1", "the dashboard listens on loopback only"
    assert urlsplit(metrics_url).path == "/metrics" and urlsplit(metrics_url).port

    # The dashboard's state API lists every actor of the run by its stable name, alive.
    actors = _poll("the named actors on the dashboard", p, lambda: _named_actors(dashboard))
    assert {n: actors[n] for n in NAMES} == dict.fromkeys(NAMES, "ALIVE")

    # Ray's metrics endpoint serves rapo's metrics once a step and an evaluation are done.
    last: list[str] = []

    def probe():
        nonlocal last
        samples = _samples(_get(_loopback(metrics_url)))
        last = _missing(samples)
        return samples if not last else None

    try:
        samples = _poll("rapo's metrics on Ray's metrics endpoint", p, probe)
    except AssertionError as e:
        raise AssertionError(f"{e}; still missing: {last}") from None
    # Gauges stay on the endpoint after they were set (Ray's agent evicts series not refreshed within two
    # report intervals; the controller keeps them fresh): the initial evaluation's accuracy is still
    # there steps later.
    target = min(_value(samples, "ray_rapo_policy_version") + 2, STEPS)

    def later():
        s = _samples(_get(_loopback(metrics_url)))
        return s if (_value(s, "ray_rapo_policy_version") or 0) >= target else None

    later_samples = _poll(f"policy version {target} on the endpoint", p, later)
    assert _value(later_samples, "ray_rapo_accuracy", split="eval") is not None, "the eval accuracy gauge went stale"
    assert _value(later_samples, "ray_rapo_episodes_total") >= 8 * target
    # Ray's labels are there for the dashboard's $session variable.
    assert all("SessionName" in lab for lab, _ in samples["ray_rapo_episodes_total"])
    # Ray's own metrics share the endpoint.
    assert any(name.startswith("ray_") and not name.startswith("ray_rapo_") for name in samples)

    # And the run still completes, and everything it started is gone with it.
    assert p.wait(timeout=900) == 0, p.output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert p.group_gone(timeout=60)
    final = json.loads(Path(run / "status.json").read_text())
    assert final["metrics_url"] == metrics_url
