"""Per-step numbers computed from trajectories and learner sums (pure; the controller logs them)."""

from __future__ import annotations

from collections import Counter

import numpy as np

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
    for reason in ("answered", "max_tool_calls", "context", "turn_length"):
        out[f"{prefix}/finish_{reason}"] = float(np.mean([t.finish_reason == reason for t in trajs]))
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
