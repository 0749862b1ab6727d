"""cluster/ray_metrics.py: the controller's per-step numbers become the dashboard's metrics (no Ray cluster)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from cluster import ray_metrics as rm
from cluster.ray_metrics import Record

ROOT = Path(__file__).resolve().parents[2]

# What the controller logs after a step (cluster/controller.py, Controller._trainer), trimmed.
STEP = {
    "step": 3,
    "policy_version": 3,
    "questions": ["q1", "q2"],
    "train/accuracy": 0.25,
    "train/response_tokens": 40.5,
    "train/tool_calls_per_episode": 1.5,
    "reward/mean": 0.325,
    "reward/std": 0.4,
    "learner/loss": -0.01,
    "time/generate_s": 2.5,
    "time/reward_s": 0.01,
    "time/wait_s": 0.2,
    "time/train_s": 1.25,
    "time/weight_sync_s": 0.5,
    "time/step_s": 2.0,
    "pipeline/running_groups": 3.0,
    "staleness/lag_0": 4.0,
    "queue/groups_depth": 2,
}


def by_name(records: list[Record]) -> dict[str, list[tuple[float, dict]]]:
    out: dict[str, list[tuple[float, dict]]] = {}
    for r in records:
        out.setdefault(r.name, []).append((r.value, r.tags))
    return out


def test_step_records_map_the_controller_metrics():
    got = by_name(rm.step_records(STEP, episodes=8, lags=[0, 1]))
    assert got["rapo_episodes_total"] == [(8.0, {})]
    assert got["rapo_generated_tokens_total"] == [(324.0, {})]  # 40.5 tokens per episode x 8 episodes
    assert got["rapo_reward"] == [(0.325, {})]
    assert got["rapo_accuracy"] == [(0.25, {"split": "train"})]
    assert got["rapo_policy_version"] == [(3.0, {})]
    assert got["rapo_staleness"] == [(0.0, {}), (1.0, {})]
    assert sorted(got["rapo_queue_depth"], key=lambda v: v[1]["queue"]) == [
        (2.0, {"queue": "groups"}),
        (3.0, {"queue": "running"}),
    ]
    assert got["rapo_weight_sync_seconds"] == [(0.5, {})]
    assert {t["phase"]: v for v, t in got["rapo_step_seconds"]} == {
        "generate": 2.5,
        "reward": 0.01,
        "wait": 0.2,
        "train": 1.25,
        "weight_sync": 0.5,
        "step": 2.0,
    }
    assert set(got) <= set(rm.SPECS)
    assert not {"rapo_judge_latency_seconds", "rapo_judge_errors_total"} & set(got)


def test_step_records_skip_what_is_missing_zero_or_not_a_number():
    got = by_name(
        rm.step_records(
            {
                "reward/mean": math.nan,
                "train/accuracy": None,
                "policy_version": 1,
                "questions": ["q"],
                "time/train_s": "slow",
                "train/response_tokens": 0.0,
            },
            episodes=0,
        )
    )
    # No episodes, no tokens: counters never get a zero increment; NaN, None and text are no observations.
    assert got == {"rapo_policy_version": [(1.0, {})]}


def test_eval_records():
    got = by_name(rm.eval_records({"step": 0, "eval/accuracy": 0.5, "eval/response_tokens": 30.0, "time/eval_s": 4.0}))
    assert got == {"rapo_accuracy": [(0.5, {"split": "eval"})], "rapo_step_seconds": [(4.0, {"phase": "eval"})]}


def test_judge_records_and_failure_increments():
    seen: dict[str, int] = {}
    assert rm.new_counts({"timeout": 2}, seen) == {"timeout": 2}
    assert rm.new_counts({"timeout": 2, "http_5xx": 1}, seen) == {"http_5xx": 1}
    assert rm.new_counts({"timeout": 2, "http_5xx": 1}, seen) == {}
    got = rm.judge_records([0.5, 0.00002], {"timeout": 2, "http_429": 0})
    assert got == [
        Record("rapo_judge_latency_seconds", 0.5, {}),
        Record("rapo_judge_latency_seconds", 0.00002, {}),
        Record("rapo_judge_errors_total", 2.0, {"reason": "timeout"}),
    ]


class FakeMetric:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


def test_emit_calls_what_each_kind_takes():
    fakes = {name: FakeMetric() for name in rm.SPECS}
    rm.emit(
        [
            Record("rapo_episodes_total", 8.0, {}),
            Record("rapo_accuracy", 0.5, {"split": "eval"}),
            Record("rapo_staleness", 1.0, {}),
        ],
        fakes,
    )
    assert fakes["rapo_episodes_total"].calls == [("inc", 8.0, {})]
    assert fakes["rapo_accuracy"].calls == [("set", 0.5, {"split": "eval"})]
    assert fakes["rapo_staleness"].calls == [("observe", 1.0, {})]


def test_gauges_are_kept_fresh():
    """Ray's agent drops a gauge series not set for two report intervals: the keeper sets the last values again."""
    fakes = {name: FakeMetric() for name in rm.SPECS}
    keeper = rm.GaugeKeeper(period_s=3600)
    rm.emit(
        [
            Record("rapo_accuracy", 0.5, {"split": "eval"}),
            Record("rapo_accuracy", 0.25, {"split": "train"}),
            Record("rapo_episodes_total", 8.0, {}),
        ],
        fakes,
        keeper,
    )
    rm.emit([Record("rapo_accuracy", 0.75, {"split": "train"})], fakes, keeper)
    assert keeper.thread is not None and keeper.thread.daemon
    fakes["rapo_accuracy"].calls.clear()
    keeper.refresh()
    assert sorted(fakes["rapo_accuracy"].calls, key=str) == [
        ("set", 0.5, {"split": "eval"}),
        ("set", 0.75, {"split": "train"}),
    ]
    assert fakes["rapo_episodes_total"].calls == [("inc", 8.0, {})]  # counters are cumulative: never repeated


def test_emit_never_raises():
    class Broken(FakeMetric):
        def inc(self, value, tags):
            raise RuntimeError("no metrics agent")

    rm.emit([Record("rapo_episodes_total", 1.0, {})], {"rapo_episodes_total": Broken()})
    rm.emit([Record("rapo_episodes_total", 1.0, {})], {})  # unknown to the registry


@pytest.mark.parametrize("spec", rm.SPECS.values(), ids=lambda s: s.name)
def test_specs_are_valid_ray_metrics(spec):
    assert re.fullmatch(r"rapo_[a-z_]+", spec.name)
    assert (spec.kind == rm.COUNTER) == spec.name.endswith("_total")  # Ray exports counters as NAME (or NAME_total)
    if spec.kind == rm.HISTOGRAM:
        b = spec.boundaries
        assert b and all(x > 0 for x in b) and list(b) == sorted(set(b))
    else:
        assert not spec.boundaries


def test_real_ray_metric_objects_can_be_made_without_a_cluster():
    made = rm.registry()
    assert set(made) == set(rm.SPECS)
    assert type(made["rapo_staleness"]).__name__ == "Histogram" and made["rapo_staleness"].boundaries == list(
        rm.STALENESS_BUCKETS
    )


def test_the_grafana_dashboard_charts_exactly_these_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "rapo-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    charted = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bray_(rapo_\w+)", exprs)}
    assert charted == set(rm.SPECS)
    for tag in ("split", "queue", "reason", "phase"):
        assert any(tag in s.tag_keys for s in rm.SPECS.values()), tag


def test_lags_are_whole_versions_and_on_policy_has_its_own_bucket():
    assert rm.STALENESS_BUCKETS[0] < 1 and rm.STALENESS_BUCKETS[1] == 1
