"""During a run, the Ray dashboard lists the run's named actors and Ray's metrics endpoint serves
rapo's custom metrics (cluster/ray_metrics.py), which deploy/grafana/rapo-dashboard.json charts.

The shared smoke run (tests/e2e/conftest.py: smoke_run) is watched while it goes on by
tests/e2e/live_run.py (observe); this test asserts on what was seen, and on how the run ended.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import SMOKE_STEPS as STEPS
from tests.e2e.live_run import NAMES, value

pytestmark = pytest.mark.slow


def test_dashboard_lists_named_actors_and_metrics_endpoint_serves_custom_metrics(smoke_run):
    live, run = smoke_run.live, smoke_run.out
    assert live["error"] is None, live["error"]
    status = live["status"]
    dashboard, metrics_url = status["dashboard_url"].rstrip("/"), status["metrics_url"]
    assert urlsplit(dashboard).hostname == "127.0.0.1", "the dashboard listens on loopback only"
    assert urlsplit(metrics_url).path == "/metrics" and urlsplit(metrics_url).port

    # The dashboard's state API listed every actor of the run by its stable name, alive.
    actors = live["actors"]
    assert {n: actors[n] for n in NAMES} == dict.fromkeys(NAMES, "ALIVE")

    # Ray's metrics endpoint served rapo's metrics once a step and an evaluation were done (observe
    # polled until every one of live_run.EXPECTED was there). Gauges stay on the endpoint after they were
    # set (Ray's agent evicts series not refreshed within two report intervals; the controller keeps them
    # fresh): the initial evaluation's accuracy is still there two policy versions later.
    samples, later, target = live["samples"], live["later_samples"], live["target"]
    assert value(later, "ray_rapo_policy_version") >= target
    assert value(later, "ray_rapo_accuracy", split="eval") is not None, "the eval accuracy gauge went stale"
    assert value(later, "ray_rapo_episodes_total") >= 8 * target
    # Ray's labels are there for the dashboard's $session variable.
    assert all("SessionName" in lab for lab, _ in samples["ray_rapo_episodes_total"])
    # Ray's own metrics share the endpoint.
    assert any(name.startswith("ray_") and not name.startswith("ray_rapo_") for name in samples)

    # And the run still completed, and everything it started is gone with it.
    assert smoke_run.code == 0, smoke_run.output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert smoke_run.gone
    final = json.loads((run / "status.json").read_text())
    assert final["metrics_url"] == metrics_url
