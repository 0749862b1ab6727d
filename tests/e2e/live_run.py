"""What a run shows while it goes on: the Ray dashboard's named actors and Ray's metrics endpoint
serving rapo's custom metrics (cluster/ray_metrics.py), which deploy/grafana/rapo-dashboard.json charts.

Ray exports custom metrics in batches (every RAY_metrics_report_interval_ms, shortened by the shared
smoke run), so both are polled until they show up or the run ends; nothing here depends on how fast a
step is. `observe` records what it saw; tests/e2e/test_dashboard_metrics.py asserts on it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from urllib.parse import urlsplit

from tests.e2e.test_fault_tolerance import _read

NAMES = ("controller", "rollout-0", "learner-0", "judge-0")
# Ray's metrics agent publishes every 2 s instead of its default 10 s.
METRICS_ENV = {"RAY_metrics_report_interval_ms": "2000"}


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


def samples_of(text: str) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name: str, **labels: str) -> float | None:
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


def missing(samples) -> list[str]:
    out = []
    for name, labels, ok in EXPECTED:
        v = value(samples, name, **labels)
        if v is None or not ok(v):
            out.append(f"{name}{labels or ''}={v}")
    return out


def observe(run, proc, steps: int) -> dict:
    """Watch a live run of ``steps`` steps in folder ``run``: the URLs of its status.json, the named actors
    on the dashboard, the metrics endpoint once a step and an evaluation are done, and again two policy
    versions later. What was seen goes in the returned dict; "error" says what was not seen, and why."""
    seen: dict = {"error": None}
    try:
        status = _poll("status.json with the dashboard and metrics URLs", proc,
                       lambda: (s := _read(run / "status.json")).get("dashboard_url") and s.get("metrics_url") and s)
        seen["status"] = status
        dashboard, metrics_url = status["dashboard_url"].rstrip("/"), status["metrics_url"]
        seen["actors"] = _poll("the named actors on the dashboard", proc, lambda: _named_actors(dashboard))

        last: list[str] = []

        def probe():
            nonlocal last
            samples = samples_of(_get(_loopback(metrics_url)))
            last = missing(samples)
            return samples if not last else None

        try:
            seen["samples"] = samples = _poll("rapo's metrics on Ray's metrics endpoint", proc, probe)
        except AssertionError as e:
            raise AssertionError(f"{e}; still missing: {last}") from None
        seen["target"] = target = min(value(samples, "ray_rapo_policy_version") + 2, steps)

        def later():
            s = samples_of(_get(_loopback(metrics_url)))
            return s if (value(s, "ray_rapo_policy_version") or 0) >= target else None

        seen["later_samples"] = _poll(f"policy version {target} on the endpoint", proc, later)
    except AssertionError as e:
        seen["error"] = str(e)
    return seen
