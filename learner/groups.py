"""A question's n scored rollouts (a GRPO group), and turning a batch of groups into train samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learner.advantages import batch_advantages
from learner.batch import TrainSample
from rollout.types import Trajectory


@dataclass
class ScoredGroup:
    question_id: str
    members: list[Trajectory]

    @property
    def rewards(self) -> np.ndarray:
        return np.array([m.reward for m in self.members], dtype=np.float64)

    @property
    def all_failed(self) -> bool:
        return not any(m.correct for m in self.members)


def group_by_question(trajectories: list[Trajectory], n: int) -> list[ScoredGroup]:
    """Groups in first-seen order; each must hold exactly n scored members."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        if t.reward is None:
            raise ValueError(f"trajectory {t.question_id}/{t.sample_index} has no reward yet")
        groups.setdefault(t.question_id, []).append(t)
    out = []
    for qid, members in groups.items():
        if len(members) != n:
            raise ValueError(f"question {qid} has {len(members)} rollouts, expected {n}")
        out.append(ScoredGroup(qid, sorted(members, key=lambda m: m.sample_index)))
    return out


def batch_samples(groups: list[ScoredGroup], *, std: str, eps: float, scale: bool, version: int) -> tuple[list[TrainSample], float, int]:
    """Group-normalised advantages (optionally scaled by G/G_good) broadcast to each member's tokens.

    Returns the samples, the scale factor applied and the number of groups with reward spread.
    """
    stats = batch_advantages(np.stack([g.rewards for g in groups]), std=std, eps=eps, scale=scale)
    samples = []
    for g, row in zip(groups, stats.advantages):
        for m, a in zip(g.members, row):
            samples.append(
                TrainSample(
                    m.token_ids, m.loss_mask, m.behaviour_logprobs, float(a), m.question_id, m.replayed,
                    staleness=version - m.policy_version_start,
                )
            )
    return samples, stats.scale_factor, stats.n_good
