"""The controller's checkpointed state survives a save and a load unchanged."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cluster.config import RunConfig
from cluster.run_metrics import idle_fractions, judge_metrics, run_summary
from cluster.run_state import PendingGroup, RunState, checkpoint_tags, latest_tag, load_latest
from learner.pruning import EpochLedger
from learner.scheduler import SchedulerState


def _state() -> RunState:
    return RunState(
        step=3, version=4, history=[{"step": 1, "reward/mean": 0.5}], evals=[{"step": 0, "eval/accuracy": 0.25}],
        replay_injections=2, mlflow_run_id="abc", elapsed_s=12.5, counts=Counter(admitted=9, trained=6),
        group_counter=9, in_flight=[PendingGroup("g8", "q1", 1), PendingGroup("g3r", "q2", 0)],
        pruning_epochs=EpochLedger({0: {"g7"}, 1: {"g8", "g9"}}, {0}), trained_group_ids={"g1", "g2"},
        staleness=Counter({0: 5, 2: 1}), learner_restarts=1, scheduler=SchedulerState(1, 3, ["q9"]),
        pruned_at={"q9": 0}, last_epoch_drawn=1,
    )


def test_round_trip_through_json_keeps_every_field():
    state = _state()
    assert RunState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_a_checkpoint_from_before_pruning_epochs_loads_with_none_recorded():
    old = _state().to_dict()
    del old["pruned_at"], old["last_epoch_drawn"]
    state = RunState.from_dict(old)
    assert state.pruned_at == {} and state.last_epoch_drawn == 0


def test_save_moves_latest_and_load_reads_it_back(tmp_path):
    assert latest_tag(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="rapo_latest"):
        load_latest(tmp_path)
    for step in (1, 2):
        (tmp_path / f"step-{step:06d}").mkdir()
        state = _state()
        state.step = step
        state.save(tmp_path, f"step-{step:06d}")
    (tmp_path / "step-000003").mkdir()  # a learner checkpoint whose run state was never written
    tag, loaded = load_latest(tmp_path)
    assert tag == "step-000002" and loaded.step == 2 and loaded.in_flight == _state().in_flight
    assert checkpoint_tags(tmp_path) == ["step-000001", "step-000002"]


def test_judge_metrics_mean_latency_and_client_counts():
    tally = Counter({"judge/scored": 4, "judge/latency_sum_s": 2.0, "labels/GOOD": 3})
    out = judge_metrics(tally, {"requests": 5, "latency_count": 4, "latency_sum_s": 1.0, "failures_timeout": 2})
    assert out["judge/latency_s"] == 0.5 and out["labels/GOOD"] == 3.0 and "judge/latency_sum_s" not in out
    assert out["judge/requests"] == 5.0 and out["judge/request_latency_s"] == 0.25
    assert out["judge/failures_timeout"] == 2.0
    assert "judge/requests" not in judge_metrics(tally, None)


def test_idle_fractions_count_only_time_since_the_pipeline_started():
    assert idle_fractions(0.0, {"w0": 5.0}, {}, 1.0) == {}
    out = idle_fractions(10.0, {"w0": 9.0, "w1": 5.0}, {"w0": 4.0}, 2.5)
    assert out == {"pipeline/rollout_idle_fraction": 0.5, "pipeline/learner_idle_fraction": 0.75}


def test_summary_counts_lost_and_leftover_episodes():
    cfg = RunConfig()
    n = cfg.pipeline.samples_per_question
    s = run_summary(
        cfg, _state(), status="completed", run_id="r", engine_kind="simulated", fleet_size=2, worker_restarts=0,
        eval_questions=4, replay_stored=0, judge_stats={}, judge_tally=Counter(), pruned_questions=0,
        left_queued=1, running=1, requeued=0, wall_time_s=1.0, model_dir="m", model_source="path", errors=[],
    )
    # 9 admitted = 6 trained + 1 queued + 1 running + 1 lost.
    assert s["lost_episodes"] == n and s["leftover_episodes"] == 2 * n and s["learner"] == cfg.learner.backend
    assert s["accuracy_initial"] == 0.25 and s["accuracy_final"] is None
    assert s["staleness_histogram"] == {"0": 5, "2": 1}
    assert s["precision"] == {} and s["rapo_per_step"] == [{"step": 1}] and s["episodes_saved_by_pruning"] == 0


def test_groups_dropped_after_failing_are_counted_not_lost():
    cfg = RunConfig()
    n = cfg.pipeline.samples_per_question
    state = _state()
    state.counts.update(failed_groups=1, failed_episodes=3 * n + 2)
    s = run_summary(
        cfg, state, status="completed", run_id="r", engine_kind="simulated", fleet_size=2, worker_restarts=0,
        eval_questions=4, replay_stored=0, judge_stats={}, judge_tally=Counter(), pruned_questions=0,
        left_queued=1, running=1, requeued=0, wall_time_s=1.0, model_dir="m", model_source="path", errors=[],
    )
    # 9 admitted = 6 trained + 1 dropped after failing + 1 queued + 1 running: nothing lost.
    assert s["lost_episodes"] == 0
    assert (s["failed_groups_dropped"], s["failed_episodes"]) == (1, 3 * n + 2)


def test_a_pending_group_keeps_its_failures_through_a_checkpoint():
    state = _state()
    state.in_flight = [PendingGroup("g8", "q1", 1, failures=2)]
    assert RunState.from_dict(json.loads(json.dumps(state.to_dict()))).in_flight[0].failures == 2
    # A checkpoint written before groups counted failures still loads.
    old = state.to_dict()
    old["in_flight"] = [{"group_id": "g8", "question_id": "q1", "epoch": 1}]
    assert RunState.from_dict(old).in_flight[0].failures == 0


def _summary_with_evals(evals: list[dict]) -> dict:
    state = _state()
    state.evals = evals
    return run_summary(
        RunConfig(), state, status="completed", run_id="r", engine_kind="simulated", fleet_size=1, worker_restarts=0,
        eval_questions=4, replay_stored=0, judge_stats={}, judge_tally=Counter(), pruned_questions=0,
        left_queued=0, running=0, requeued=0, wall_time_s=1.0, model_dir="m", model_source="path", errors=[],
    )


def test_initial_and_final_accuracy_come_from_step_0_and_a_later_eval_only():
    start, mid, end = ({"step": s, "eval/accuracy": a} for s, a in ((0, 0.25), (2, 0.5), (4, 0.75)))
    both = _summary_with_evals([start, mid, end])
    assert (both["accuracy_initial"], both["accuracy_final"]) == (0.25, 0.75)
    # pipeline.eval_at_start false: the final eval is not taken for the starting policy's.
    no_start = _summary_with_evals([mid, end])
    assert (no_start["accuracy_initial"], no_start["accuracy_final"]) == (None, 0.75)
    # Stopped before step 1: the starting policy's eval is not a final one.
    stopped = _summary_with_evals([start])
    assert (stopped["accuracy_initial"], stopped["accuracy_final"]) == (0.25, None)
