"""RAPO advantage pieces on top of GRPO (docs/rapo.md §3), as pure numpy functions.

Rewards arrive as a [G, n] matrix: one row per question (group), one column per rollout.
A group with no reward spread ("bad" group) carries no learning signal; RAPO restores the
gradient magnitude by scaling the good groups (G / G_good), by replaying a stored correct
trajectory into all-fail groups, and by pruning questions the policy already solves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np

StdKind = Literal["sample", "population"]

# A group whose reward range is at most this is a "bad" group: its advantages are exactly 0
# and it is not counted in G_good. One tolerance for both keeps the invariant
# "n_good == rows with a non-zero advantage".
SPREAD_TOL = 1e-12


def _check_rewards(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be a [groups, rollouts] matrix, got shape {r.shape}")
    if r.shape[1] == 0:
        raise ValueError("rewards has groups with no rollouts (shape [G, 0])")
    if not np.isfinite(r).all():
        raise ValueError("rewards contain NaN or infinity")
    return r


def good_groups(rewards: np.ndarray) -> np.ndarray:
    """Bool [G]: groups with non-zero reward spread (σ_R > 0)."""
    r = _check_rewards(rewards)
    return np.ptp(r, axis=1) > SPREAD_TOL


def group_advantages(rewards: np.ndarray, std: StdKind = "sample", eps: float = 1e-6) -> np.ndarray:
    """Â = (r − mean) / (std + eps) per group; groups with zero spread get exactly 0.

    ``std="sample"`` is the unbiased (ddof=1) std that verl, OpenRLHF and TRL use;
    ``"population"`` (ddof=0) is the paper's σ_R. A single-rollout group has no spread and
    gets 0 (verl instead passes the raw reward through; a lone sample has no baseline).
    """
    if std not in ("sample", "population"):
        raise ValueError(f"std must be 'sample' or 'population', got {std!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = _check_rewards(rewards)
    good = good_groups(r)
    centred = r - r.mean(axis=1, keepdims=True)
    ddof = 1 if std == "sample" else 0
    # Only good groups have n >= 2 here, so n - ddof > 0 wherever the result is used.
    denom = max(r.shape[1] - ddof, 1)
    sd = np.sqrt((centred**2).sum(axis=1, keepdims=True) / denom)
    # A good group has sd > 0, so the division is safe even with eps = 0.
    return np.where(good[:, None], centred / np.where(good[:, None], sd + eps, 1.0), 0.0)


def advantage_scale(rewards: np.ndarray) -> float:
    """G / G_good (paper Eq. 6, G = groups in the batch); 1.0 when no group is good."""
    good = good_groups(rewards)
    n_good = int(good.sum())
    return 1.0 if n_good == 0 else good.size / n_good


class GroupStats(NamedTuple):
    advantages: np.ndarray  # [G, n], scaled when asked
    scale_factor: float  # G / G_good, or 1.0 when scaling is off or no group is good
    n_good: int  # groups with non-zero spread


def batch_advantages(
    rewards: np.ndarray, *, std: StdKind = "sample", eps: float = 1e-6, scale: bool = True
) -> GroupStats:
    """Group advantages for a whole training batch, with RAPO scaling when ``scale``.

    Pass the rewards *after* replay injection: an injected group becomes good and must count.
    The factor multiplies the whole matrix; bad groups are 0 either way.
    """
    adv = group_advantages(rewards, std=std, eps=eps)
    n_good = int(good_groups(rewards).sum())
    factor = advantage_scale(rewards) if scale else 1.0
    return GroupStats(adv * factor, factor, n_good)


def plan_replay_injections(
    correct: np.ndarray, has_stored: Sequence[bool], rng: np.random.Generator
) -> list[int | None]:
    """Per group, the rollout index to overwrite with the stored correct trajectory, or None.

    Only groups where every rollout is incorrect and the replay buffer holds a trajectory for
    the question are injected; the member is drawn uniformly so no rollout slot is favoured.
    """
    c = np.asarray(correct)
    if c.dtype != np.bool_:
        raise TypeError(f"correct must be a bool matrix (judged correct), got dtype {c.dtype}")
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"correct must be a [groups, rollouts] matrix with rollouts, got shape {c.shape}")
    stored = np.asarray(has_stored, dtype=bool)
    if stored.shape != (c.shape[0],):
        raise ValueError(f"has_stored has {stored.size} entries for {c.shape[0]} groups")
    eligible = ~c.any(axis=1) & stored
    picks = rng.integers(0, c.shape[1], size=int(eligible.sum()))
    plan: list[int | None] = [None] * c.shape[0]
    for g, j in zip(np.flatnonzero(eligible), picks):
        plan[int(g)] = int(j)
    return plan


def questions_to_prune(
    correct_counts: Mapping[str, int], totals: Mapping[str, int], threshold: float = 0.9,
    max_prune: int | None = None,
) -> set[str]:
    """Questions whose judged-correct rate this epoch is ≥ threshold (paper Eq. 5).

    "Solved" means judged correct, not reward > 0: a well-formatted wrong answer already
    earns 0.1. A question absent from ``correct_counts`` solved nothing; one with total 0
    was not rolled out and is never pruned. ``max_prune`` caps how many go (in id order), so
    that a small pool keeps enough questions for a step.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    orphans = sorted(set(correct_counts) - set(totals))
    if orphans:
        raise ValueError(f"correct counts for questions without a total: {orphans[:5]}")
    pruned: set[str] = set()
    for qid, total in totals.items():
        n_correct = correct_counts.get(qid, 0)
        if total < 0 or not 0 <= n_correct <= max(total, 0):
            raise ValueError(f"question {qid!r}: {n_correct} correct out of {total} is impossible")
        # Integer division is correctly rounded, so 9/10 compares equal to the literal 0.9.
        if total > 0 and n_correct / total >= threshold:
            pruned.add(qid)
    if max_prune is not None:
        pruned = set(sorted(pruned)[: max(0, max_prune)])
    return pruned
