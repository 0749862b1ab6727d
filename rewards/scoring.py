"""Turn a finished trajectory into its reward: judge the answer, apply the stage's formula."""

from __future__ import annotations

from rewards.answer import rule_judge
from rewards.formulas import stage1_reward
from rollout.types import Question, Trajectory


def score_stage1(traj: Trajectory, question: Question, format_weight: float = 0.1) -> Trajectory:
    """Rule-judge the answer and set ``correct`` and ``reward`` (stage 1: format + answer)."""
    traj.correct = rule_judge(traj.answer, question.golds())
    traj.reward = stage1_reward(traj.format_ok, traj.correct, format_weight)
    return traj
