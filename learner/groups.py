"""A question's n scored rollouts (a GRPO group), and turning a batch of groups into train samples."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from learner.advantages import batch_advantages, plan_replay_injections
from learner.batch import TrainSample
from rollout.types import Trajectory


@dataclass
class ScoredGroup:
    question_id: str
    members: list[Trajectory]
    # Unique per admission (so a re-run group is recognisable), and the epoch it was drawn in.
    group_id: str = ""
    epoch: int = 0
    # Below 1 for an over-stale group that is down-weighted rather than dropped (not stored).
    weight: float = 1.0
    # Wall time the group spent in generation (all its episodes) and in reward labelling.
    generate_s: float = 0.0
    reward_s: float = 0.0

    @property
    def version_start(self) -> int:
        """The oldest policy any fresh member started under (replayed members do not count)."""
        fresh = [m.policy_version_start for m in self.members if not m.replayed]
        return min(fresh) if fresh else max(m.policy_version_start for m in self.members)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([m.reward for m in self.members], dtype=np.float64)

    @property
    def all_failed(self) -> bool:
        return not any(m.correct for m in self.members)


def inject_replays(
    groups: list[ScoredGroup], stored: list[Trajectory | None], rng: np.random.Generator
) -> list[int | None]:
    """RAPO replay: in each all-fail group whose question has a stored success, replace one random member.

    The copy keeps the stored tokens, masks, logprobs and reward, and is marked ``replayed``.
    Returns, per group, the replaced member's index (None where nothing was injected).
    """
    correct = np.array([[bool(m.correct) for m in g.members] for g in groups], dtype=bool)
    plan = plan_replay_injections(correct, [s is not None for s in stored], rng)
    for g, s, idx in zip(groups, stored, plan):
        if idx is None:
            continue
        replay = copy.deepcopy(s)
        replay.replayed = True
        replay.sample_index = g.members[idx].sample_index
        g.members[idx] = replay
    return plan


def batch_samples(
    groups: list[ScoredGroup], *, std: str, eps: float, scale: bool, version: int, replay_on_policy: bool = True
) -> tuple[list[TrainSample], float, int]:
    """Group-normalised advantages (optionally scaled by G/G_good) broadcast to each member's tokens.

    With ``replay_on_policy`` a replayed member carries no behaviour logprobs, so it is treated
    as on-policy (importance weight 1) as in the paper's synchronous pipeline; otherwise its
    stored logprobs correct for its age like any stale sample.
    Returns the samples, the scale factor applied and the number of groups with reward spread.
    """
    stats = batch_advantages(np.stack([g.rewards for g in groups]), std=std, eps=eps, scale=scale)
    samples = []
    for g, row in zip(groups, stats.advantages):
        for m, a in zip(g.members, row * g.weight):
            samples.append(
                TrainSample(
                    m.token_ids,
                    m.loss_mask,
                    None if (m.replayed and replay_on_policy) else m.behaviour_logprobs,
                    float(a),
                    m.question_id,
                    m.replayed,
                    staleness=version - m.policy_version_start,
                )
            )
    return samples, stats.scale_factor, stats.n_good
