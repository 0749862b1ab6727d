"""Turn a finished trajectory into its reward: judge the answer, label the tool calls, apply the stage's formula.

The judge and the labeller are either the rule-based ones (offline default) or an LLM behind
an OpenAI-compatible API (JudgeClient, which falls back to the rules and counts it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rewards.answer import rule_judge
from rewards.formulas import stage1_reward, stage2_reward
from rewards.labeller import rule_labels
from rollout.types import Question, Trajectory, describe_error

if TYPE_CHECKING:
    from rewards.judge_client import JudgeClient


@dataclass(frozen=True)
class RewardSpec:
    stage: int = 1
    format_weight: float = 0.1
    c_search: float = 0.2
    c_query: float = 0.2
    cap_search: int = 8
    cap_query: int = 16
    budget_verification: int = 1
    clamp_delta: bool = False


@dataclass
class Score:
    reward: float
    correct: bool
    labels: list[str] = field(default_factory=list)
    # rule | llm | cache | shared | skipped: where the verdict (and the labels) came from.
    judge_source: str = "rule"
    labels_source: str = ""
    # Remote calls repeated after a failure, fallbacks to the rules, time spent judging.
    retries: int = 0
    fallbacks: int = 0
    latency_s: float = 0.0
    # Set when the episode failed (judge_source "failed") or judging it raised ("error"): reward 0.
    error: str = ""


def failed_score(error: str, source: str = "failed") -> Score:
    return Score(0.0, False, [], source, "", error=error)


async def score_or_fail(
    traj: Trajectory, question: Question, spec: RewardSpec, judge: JudgeClient | None = None, llm_labels: bool = False
) -> Score:
    """score_trajectory as the error boundary of one episode's judging: whatever raises becomes that
    episode's failure (reward 0, the error recorded), and the episodes judged beside it go on."""
    try:
        return await score_trajectory(traj, question, spec, judge, llm_labels)
    except Exception as e:  # noqa: BLE001
        return failed_score(describe_error(e), "error")


async def score_trajectory(
    traj: Trajectory, question: Question, spec: RewardSpec, judge: JudgeClient | None = None, llm_labels: bool = False
) -> Score:
    if traj.error:
        return failed_score(traj.error)  # nothing to judge: the episode itself failed
    t0 = time.perf_counter()
    retries = fallbacks = 0
    if judge is None:
        correct, judge_source = rule_judge(traj.answer, question.golds()), "rule"
    else:
        verdict = await judge.judge_answer(question.question, list(question.golds()), traj.answer)
        correct, judge_source = verdict.correct, verdict.source
        retries, fallbacks = max(0, verdict.attempts - 1), int(verdict.fallback)
    if spec.stage == 1:
        reward = stage1_reward(traj.format_ok, correct, spec.format_weight)
        return Score(reward, correct, [], judge_source, "", retries, fallbacks, time.perf_counter() - t0)
    if llm_labels and judge is not None:
        outcome = await judge.label_steps(
            question.question, traj.tool_calls, budget_verification=spec.budget_verification
        )
        labels, labels_source = outcome.labels, outcome.source
        retries, fallbacks = retries + max(0, outcome.attempts - 1), fallbacks + int(outcome.fallback)
    else:
        labels, labels_source = rule_labels(traj.tool_calls, budget_verification=spec.budget_verification), "rule"
    reward = spec_reward(spec, traj.format_ok, correct, labels)
    return Score(reward, correct, labels, judge_source, labels_source, retries, fallbacks, time.perf_counter() - t0)


def apply_score(traj: Trajectory, score: Score) -> Trajectory:
    traj.reward, traj.correct, traj.labels = score.reward, score.correct, list(score.labels)
    if score.error and not traj.error:
        traj.error, traj.finish_reason = score.error, "error"
        traj.loss_mask = [0] * len(traj.token_ids)  # judged by nobody: trained on by nobody
    return traj


def spec_reward(spec: RewardSpec, format_ok: bool, correct: bool, labels) -> float:
    """The reward ``spec`` gives an episode: stage 1 from format and answer, stage 2 also from its step labels."""
    if spec.stage == 1:
        return stage1_reward(format_ok, correct, spec.format_weight)
    return stage2_reward(
        format_ok, correct, labels, format_weight=spec.format_weight, c_search=spec.c_search, c_query=spec.c_query,
        cap_search=spec.cap_search, cap_query=spec.cap_query, clamp_delta=spec.clamp_delta,
    )
