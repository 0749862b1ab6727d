"""A run's numbers, computed from trajectories, learner sums and the run state (pure; the controller
logs them): per-step metrics, cumulative judge counts, and the summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from cluster.config import RunConfig
from cluster.run_state import RunState
from learner.advantages import advantage_scale, good_groups
from learner.groups import ScoredGroup
from rewards.report import PoolReport
from rollout.types import Trajectory

LEARNER_MEANS = ("pg_loss", "kl", "entropy", "clip_frac", "ratio", "is_weight", "prox_behaviour_abs_diff")


def trajectory_metrics(trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    if not trajs:
        return {}
    out = {
        f"{prefix}/accuracy": float(np.mean([bool(t.correct) for t in trajs])),
        f"{prefix}/format_ok": float(np.mean([t.format_ok for t in trajs])),
        f"{prefix}/tool_calls_per_episode": float(np.mean([t.num_tool_calls for t in trajs])),
        f"{prefix}/response_tokens": float(np.mean([t.generated_tokens for t in trajs])),
        f"{prefix}/episode_tokens": float(np.mean([len(t.token_ids) for t in trajs])),
        f"{prefix}/turns": float(np.mean([t.num_turns for t in trajs])),
    }
    if all(t.reward is not None for t in trajs):
        out[f"{prefix}/reward"] = float(np.mean([t.reward for t in trajs]))
    for reason in ("answered", "max_tool_calls", "context", "turn_length", "error"):
        out[f"{prefix}/finish_{reason}"] = float(np.mean([t.finish_reason == reason for t in trajs]))
    # Episodes that raised (engine, tool, parse or judge): reward 0, nothing trained, the error kept.
    out[f"{prefix}/failed_episodes"] = float(sum(bool(t.error) for t in trajs))
    calls = sum(t.num_tool_calls for t in trajs)
    bad = sum(1 for t in trajs for c in t.tool_calls if not c.ok)
    out[f"{prefix}/tool_error_rate"] = bad / calls if calls else 0.0
    return out


def reduce_learner(per_rank: list[dict]) -> dict[str, float]:
    """Per-rank sums -> token means over the whole batch (and the slowest rank's time)."""
    total = {k: sum(r[k] for r in per_rank) for k in per_rank[0]}
    tokens = max(total.pop("tokens"), 1.0)
    out = {k: total[k] / tokens for k in LEARNER_MEANS}
    out["loss"] = total["loss"]
    out["tokens"] = tokens
    out["grad_norm"] = max(r["grad_norm"] for r in per_rank)
    out["rank_time_s"] = max(r["train_time_s"] for r in per_rank)
    return out


def staleness_metrics(histogram: Counter) -> dict[str, float]:
    """Counts per policy-version lag (staleness/lag_0, lag_1, ...) and their mean and max."""
    total = sum(histogram.values())
    out = {f"staleness/lag_{lag}": float(n) for lag, n in sorted(histogram.items())}
    if total:
        out["staleness/mean"] = sum(lag * n for lag, n in histogram.items()) / total
        out["staleness/max"] = float(max(histogram))
    return out


def step_metrics(step: int, version: int, groups: list[ScoredGroup], train: dict[str, float],
                 timings: dict[str, float]) -> dict[str, Any]:
    """A training step's row: its trajectories, rewards, learner numbers and per-group timings.

    train/* describe the episodes this step's policy generated: a replayed success (an older
    policy's episode injected into an all-fail group) would otherwise count as a fresh one and
    inflate train/accuracy. reward/* are over the batch as trained, replays included.
    """
    trajs = [m for g in groups for m in g.members]
    rewards = np.array([t.reward for t in trajs])
    out: dict[str, Any] = {"step": step, "policy_version": version, "questions": sorted(g.question_id for g in groups)}
    out.update(trajectory_metrics([t for t in trajs if not t.replayed] or trajs, "train"))
    out.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())})
    out.update(train)
    # Per group (they overlap each other and, when async, training): how long its episodes took to
    # generate and to label. wait_s is what the learner idled for.
    out["time/generate_s"] = float(np.mean([g.generate_s for g in groups]))
    out["time/reward_s"] = float(np.mean([g.reward_s for g in groups]))
    out.update({f"time/{k}": v for k, v in timings.items()})
    return out


def idle_fractions(elapsed_s: float, fleet_busy: dict[str, float], fleet_busy_at_start: dict[str, float],
                   learner_busy_s: float) -> dict[str, float]:
    """How much of the pipeline's wall time the rollout workers (on average) and the learner sat idle."""
    if elapsed_s <= 0:
        return {}
    used = sum(b - fleet_busy_at_start.get(name, 0.0) for name, b in fleet_busy.items())
    return {
        "pipeline/rollout_idle_fraction": max(0.0, 1 - used / (elapsed_s * max(1, len(fleet_busy)))),
        "pipeline/learner_idle_fraction": max(0.0, 1 - learner_busy_s / elapsed_s),
    }


def judge_tally(report: PoolReport) -> dict[str, float]:
    """A PoolReport as additive counts (its mean latency as a sum) for the run's cumulative judge counts."""
    counts = {k: v for k, v in report.metrics().items() if k != "judge/latency_s"}
    counts["judge/latency_sum_s"] = report.latency_s
    return counts


def judge_metrics(tally: Counter, client: dict[str, float] | None) -> dict[str, float]:
    """Cumulative: labels/<LABEL> counts, judge/retries, judge/fallbacks, judge/source_<source>, ...;
    judge/latency_s: mean time to judge one trajectory; with an LLM judge (`client`: its HTTP
    client's stats summed over the actors), its requests, their mean latency and failures by reason."""
    out = {k: float(v) for k, v in tally.items() if k != "judge/latency_sum_s"}
    out["judge/latency_s"] = tally["judge/latency_sum_s"] / tally["judge/scored"] if tally["judge/scored"] else 0.0
    if client is not None:
        out["judge/requests"] = float(client.get("requests", 0))
        n = client.get("latency_count", 0)
        out["judge/request_latency_s"] = client.get("latency_sum_s", 0.0) / n if n else 0.0
        out.update({f"judge/{k}": float(v) for k, v in client.items() if k.startswith("failures_")})
    return out


def mean_of(history: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the steps that have it; None before the first step."""
    return float(np.mean([h[key] for h in history if key in h])) if history else None


def run_summary(cfg: RunConfig, state: RunState, *, status: str, run_id: str, engine_kind: str, fleet_size: int,
                worker_restarts: int, eval_questions: int, replay_stored: int, judge_stats: dict[str, float],
                judge_tally: Counter, pruned_questions: int, left_queued: int, running: int, requeued: int,
                wall_time_s: float, model_dir: str, model_source: str, errors: list[str],
                precision: dict[str, str] | None = None) -> dict[str, Any]:
    """summary.json: what the run did, its accuracy before and after, and its group bookkeeping."""
    n = cfg.pipeline.samples_per_question
    evals = state.evals
    # The starting policy's eval is step 0's (none with pipeline.eval_at_start false); the final is a later one.
    first = evals[0] if evals and evals[0]["step"] == 0 else {}
    final = evals[-1] if evals and evals[-1]["step"] > 0 else {}
    steps, c = state.history, state.counts
    # Every admitted group is trained, dropped as stale (and re-admitted), dropped after its episodes
    # failed every re-run, still queued or running at the end; anything else was lost.
    lost_groups = c["admitted"] - c["trained"] - c["failed_groups"] - left_queued - running - requeued
    return {
        "status": status,
        "run_id": run_id,
        "mlflow_run_id": state.mlflow_run_id,
        "mode": cfg.pipeline.mode,
        "max_staleness": cfg.pipeline.staleness_bound,
        "algorithm": cfg.learner.algorithm,
        "steps": len(steps),
        "episodes": c["trained"] * n,
        "engine": engine_kind,
        "learner": cfg.learner.backend,
        "zero_stage": cfg.learner.zero_stage,
        "learner_ranks": cfg.learner.num_ranks,
        "rollout_workers": fleet_size,
        "weight_versions_published": state.version,
        "accuracy_initial": first.get("eval/accuracy"),
        "accuracy_final": final.get("eval/accuracy"),
        "eval_questions": eval_questions,
        "reward_first_step": steps[0]["reward/mean"] if steps else None,
        "reward_last_step": steps[-1]["reward/mean"] if steps else None,
        "tool_calls_per_episode": mean_of(steps, "train/tool_calls_per_episode"),
        "response_tokens_per_episode": mean_of(steps, "train/response_tokens"),
        "mean_step_time_s": mean_of(steps, "time/step_s"),
        "replay_injections": state.replay_injections,
        "replay_stored": replay_stored,
        "pruned_questions": pruned_questions,
        "episodes_saved_by_pruning": int(steps[-1].get("rapo/episodes_saved_by_pruning", 0)) if steps else 0,
        "rapo_per_step": rapo_per_step(steps),
        "reward_stage": cfg.rewards.stage,
        "judge": "llm" if cfg.rewards.judge else "rule",
        "judge_requests": judge_stats.get("requests", 0),
        "judge_fallbacks": judge_stats.get("fallbacks", 0),
        "staleness_histogram": {str(k): v for k, v in sorted(state.staleness.items())},
        "dropped_stale_groups": c["dropped"],
        # Episodes that raised, in every group played (trained, re-run or dropped), and the groups
        # dropped because all their episodes failed every time.
        "failed_episodes": c["failed_episodes"],
        "failed_groups_dropped": c["failed_groups"],
        "lost_episodes": max(0, lost_groups) * n,
        "leftover_episodes": (left_queued + running) * n,
        "restarts": {"rollout_workers": worker_restarts, "learner": state.learner_restarts,
                     "reward_actors": int(judge_tally.get("judge/actor_failures", 0))},
        "rerun_groups": c["reruns"],
        "wall_time_s": wall_time_s,
        "model_dir": model_dir,
        "model_source": model_source,
        "precision": precision or {},
        "errors": errors,
    }


def episodes_saved_by_pruning(pruned_at: Mapping[str, int], last_epoch_drawn: int, samples_per_question: int) -> int:
    """Rollouts pruning spared: a question pruned after epoch p is not drawn in epochs p+1 .. last_epoch_drawn."""
    return samples_per_question * sum(max(0, last_epoch_drawn - p) for p in pruned_at.values())


def rapo_step_metrics(
    rewards: np.ndarray, replayed: np.ndarray, *, scaling: bool, pruned_at: Mapping[str, int], last_epoch_drawn: int,
    replay_lags: list[int] | None = None,
) -> dict[str, float]:
    """What each RAPO part did in one step, from the step's [groups, n] rewards (after replay) and replayed mask.

    good_groups: groups with reward spread (a non-zero advantage); scale_factor: G / G_good as applied
    (1 when scaling is off); injections: groups that got a stored success; pruned_questions and
    episodes_saved_by_pruning: cumulative up to this step; replay_staleness: the mean number of policy
    versions between a replayed trajectory's generation and this step (``replay_lags``).
    """
    rewards, replayed = np.asarray(rewards, dtype=np.float64), np.asarray(replayed, dtype=bool)
    if rewards.shape != replayed.shape or rewards.ndim != 2:
        raise ValueError(f"rewards {rewards.shape} and replayed {replayed.shape} must be the same [groups, n] shape")
    n_good = int(good_groups(rewards).sum())
    return {
        "rapo/groups": float(rewards.shape[0]),
        "rapo/good_groups": float(n_good),
        "rapo/scale_factor": advantage_scale(rewards) if scaling else 1.0,
        "rapo/injections": float(replayed.any(axis=1).sum()),
        "rapo/pruned_questions": float(len(pruned_at)),
        "rapo/episodes_saved_by_pruning": float(
            episodes_saved_by_pruning(pruned_at, last_epoch_drawn, rewards.shape[1])),
        "rapo/replay_staleness": float(np.mean(replay_lags)) if replay_lags else 0.0,
    }


RAPO_STEP_KEYS = ("good_groups", "scale_factor", "injections", "pruned_questions", "episodes_saved_by_pruning")


def rapo_per_step(history: list[dict]) -> list[dict[str, float]]:
    """The summary's per-step RAPO table: step, good groups, G/G_good, injections, pruned, episodes saved."""
    return [{"step": h["step"], **{k: h[f"rapo/{k}"] for k in RAPO_STEP_KEYS if f"rapo/{k}" in h}} for h in history]
