"""Answer judge and reward formulas (docs/rapo.md §2) against hand-worked numbers and bounds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards.answer import normalize_answer, rule_judge
from rewards.formulas import (
    EXPLORATION,
    LABELS,
    REDUNDANTQUERY,
    REDUNDANTSEARCH,
    UNIQUESEARCH,
    VERIFICATION,
    LabelCounts,
    count_labels,
    stage1_reward,
    stage2_reward,
)

# ---------------------------------------------------------------- normalisation and judge


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The  Quick,   Brown Fox! ", "quick brown fox"),
        ("São Paulo", "sao paulo"),  # combining tilde dropped after NFKD
        ("Zürich", "zurich"),
        ("ＡＢＣ", "abc"),  # full-width letters fold under NFKD
        ("ﬁnal", "final"),  # ligature
        ("Straße", "strasse"),  # casefold
        ("U.S.A.", "usa"),
        ("Jean-Paul Sartre", "jean paul sartre"),  # a joining dash separates words
        ("an apple a day", "apple day"),
        ("theory", "theory"),  # articles are whole words only
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@given(st.text())
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@pytest.mark.parametrize(
    ("answer", "golds", "expected"),
    [
        ("paris.", ["Paris"], True),
        ("The Eiffel Tower", ["Eiffel Tower"], True),
        ("Eiffel Tower", ["the Eiffel Tower"], True),
        ("Paris, France", ["Paris"], False),  # padding is wrong: the judge is strict
        ("Paris", ["Paris, France"], False),
        ("Lyon", ["Paris"], False),
        ("Zurich", ["Zürich"], True),
        ("NYC", ["New York City", "NYC"], True),  # any alias
        (None, ["Paris"], False),
        ("", ["Paris"], False),
        ("   ", ["Paris"], False),
        ("The", ["the"], False),  # normalises to nothing: no answer
    ],
)
def test_rule_judge(answer: str | None, golds: list[str], expected: bool) -> None:
    assert rule_judge(answer, golds) is expected


def test_rule_judge_rejects_bad_golds() -> None:
    with pytest.raises(TypeError, match="not a single str"):
        rule_judge("P", "Paris")  # a str is a Sequence of letters: "P" would match
    with pytest.raises(ValueError, match="at least one gold"):
        rule_judge("Paris", [])


# ---------------------------------------------------------------- labels


def test_count_labels_tallies_each_kind() -> None:
    counts = count_labels(
        [UNIQUESEARCH, UNIQUESEARCH, REDUNDANTSEARCH, EXPLORATION, VERIFICATION, REDUNDANTQUERY, EXPLORATION]
    )
    assert counts == LabelCounts(
        unique_search=2, redundant_search=1, exploration=2, verification=1, redundant_query=1
    )
    assert counts.total == 7
    assert counts.redundancy == pytest.approx(2 / 7)
    assert counts.delta_search == 1  # 2 − 1
    assert counts.delta_query == 2  # (2 + 1) − 1


def test_count_labels_names_unknown_label_and_allowed_ones() -> None:
    with pytest.raises(ValueError) as err:
        count_labels([UNIQUESEARCH, "uniquesearch", "BOGUS"])
    message = str(err.value)
    assert "'BOGUS'" in message and "'uniquesearch'" in message
    assert all(label in message for label in LABELS)


# ---------------------------------------------------------------- stage 1


@pytest.mark.parametrize(
    ("format_ok", "correct", "expected"),
    [(True, True, 1.0), (False, True, 0.9), (True, False, 0.1), (False, False, 0.0)],
)
def test_stage1_reward_defaults(format_ok: bool, correct: bool, expected: float) -> None:
    assert stage1_reward(format_ok, correct) == pytest.approx(expected, abs=1e-12)


def test_stage1_reward_custom_weight_and_bad_weight() -> None:
    # 0.3·1 + 0.7·0
    assert stage1_reward(True, False, format_weight=0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="format_weight"):
        stage1_reward(True, True, format_weight=1.5)


@given(st.booleans(), st.booleans(), st.floats(0, 1))
def test_stage1_reward_bounded(format_ok: bool, correct: bool, w: float) -> None:
    r = stage1_reward(format_ok, correct, format_weight=w)
    assert 0.0 <= r <= 1.0 + 1e-12
    if correct:
        assert r >= 1.0 - w - 1e-12


# ---------------------------------------------------------------- stage 2, hand-worked


def test_stage2_no_tool_calls() -> None:
    # T = 0 → ρ := 0: correct = 0.1 + max(1 − 0, 0.5) = 1.1; incorrect: Δ = 0 → 0.1.
    assert stage2_reward(True, True, []) == pytest.approx(1.1)
    assert stage2_reward(True, False, []) == pytest.approx(0.1)
    assert stage2_reward(False, False, []) == pytest.approx(0.0)


def test_stage2_all_redundant() -> None:
    labels = [REDUNDANTSEARCH] * 3 + [REDUNDANTQUERY] * 2
    # ρ = 5/5 = 1 → correct: 0.1 + max(0, 0.5) = 0.6; without format: 0.5.
    assert stage2_reward(True, True, labels) == pytest.approx(0.6)
    assert stage2_reward(False, True, labels) == pytest.approx(0.5)
    # Δ_S = −3 → 0.2·(−3/8) = −0.075; Δ_Q = −2 → 0.2·(−2/16) = −0.025; 0.1 − 0.1 = 0.
    assert stage2_reward(True, False, labels) == pytest.approx(0.0)
    # clamped: both Δ floored at 0 → 0.1.
    assert stage2_reward(True, False, labels, clamp_delta=True) == pytest.approx(0.1)


def test_stage2_verifications_beyond_budget_are_redundant() -> None:
    # One claim cross-checked three times with B_v = 1: the labeller marks the first
    # check VERIFICATION and the next two REDUNDANTQUERY.
    labels = [UNIQUESEARCH, EXPLORATION, VERIFICATION, REDUNDANTQUERY, REDUNDANTQUERY]
    # ρ = 2/5 = 0.4 → correct: 0.1 + max(0.6, 0.5) = 0.7.
    assert stage2_reward(True, True, labels) == pytest.approx(0.7)
    # Δ_S = 1 → 0.2·1/8 = 0.025; Δ_Q = (1 + 1) − 2 = 0 → 0; total 0.125.
    assert stage2_reward(True, False, labels) == pytest.approx(0.125)


def test_stage2_incorrect_negative_delta_with_and_without_clamp() -> None:
    labels = [UNIQUESEARCH] + [REDUNDANTSEARCH] * 10 + [EXPLORATION] * 4 + [REDUNDANTQUERY] * 6
    # Δ_S = 1 − 10 = −9 → 0.2·min(1, −9/8) = −0.225; Δ_Q = 4 − 6 = −2 → 0.2·(−2/16) = −0.025.
    # 0.1 − 0.225 − 0.025 = −0.15 (the paper's formula has no floor).
    assert stage2_reward(True, False, labels) == pytest.approx(-0.15)
    # Clamped: max(Δ, 0) = 0 for both → 0.1.
    assert stage2_reward(True, False, labels, clamp_delta=True) == pytest.approx(0.1)
    # Mixed signs: Δ_S = 4 − 1 = 3 (kept), Δ_Q = 0 − 1 = −1 (floored only with clamp).
    mixed = [UNIQUESEARCH] * 4 + [REDUNDANTSEARCH, REDUNDANTQUERY]
    # 0.2·3/8 = 0.075; 0.2·(−1/16) = −0.0125 → 0.0625 unclamped, 0.075 clamped (no format).
    assert stage2_reward(False, False, mixed) == pytest.approx(0.0625)
    assert stage2_reward(False, False, mixed, clamp_delta=True) == pytest.approx(0.075)


def test_stage2_incorrect_saturates_at_caps() -> None:
    labels = [UNIQUESEARCH] * 10 + [EXPLORATION] * 12 + [VERIFICATION] * 8
    # Δ_S = 10 ≥ 8 → 0.2; Δ_Q = 20 ≥ 16 → 0.2; 0.1 + 0.4 = 0.5, the incorrect maximum.
    assert stage2_reward(True, False, labels) == pytest.approx(0.5)
    # Steering: a larger cap makes the same calls worth less: 0.2·10/20 + 0.2·20/40 = 0.2.
    assert stage2_reward(False, False, labels, cap_search=20, cap_query=40) == pytest.approx(0.2)


def test_stage2_accepts_counts_and_rejects_bad_parameters() -> None:
    labels = [UNIQUESEARCH, REDUNDANTSEARCH]
    assert stage2_reward(True, True, count_labels(labels)) == stage2_reward(True, True, labels)
    with pytest.raises(ValueError, match="cap_search"):
        stage2_reward(True, False, labels, cap_search=0)
    with pytest.raises(ValueError, match="unknown tool-call label"):
        stage2_reward(True, False, ["SEARCH"])


# ---------------------------------------------------------------- stage 2, bounds

label_lists = st.lists(st.sampled_from(LABELS), max_size=40)


@given(label_lists, st.booleans())
def test_stage2_correct_in_half_to_one_point_one(labels: list[str], format_ok: bool) -> None:
    r = stage2_reward(format_ok, True, labels)
    assert 0.5 - 1e-12 <= r <= 1.1 + 1e-12


@given(label_lists, st.booleans())
def test_stage2_incorrect_at_most_half_and_never_above_a_correct(labels: list[str], format_ok: bool) -> None:
    wrong = stage2_reward(format_ok, False, labels)
    assert wrong <= 0.5 + 1e-12
    # The design intent: any incorrect rollout scores ≤ any correct one (whose floor is 0.5).
    assert wrong <= stage2_reward(False, True, [REDUNDANTSEARCH]) + 1e-12


@given(label_lists, st.booleans())
def test_stage2_incorrect_clamped_is_non_negative_and_dominates(labels: list[str], format_ok: bool) -> None:
    clamped = stage2_reward(format_ok, False, labels, clamp_delta=True)
    assert 0.0 <= clamped <= 0.5 + 1e-12
    assert clamped >= stage2_reward(format_ok, False, labels) - 1e-12


# ---- the error boundary of one episode's judging ------------------------------------------------------


def _traj(**kw):
    from rollout.types import ToolCall, Trajectory

    base = dict(
        question_id="q",
        sample_index=0,
        token_ids=[1, 2, 3],
        loss_mask=[0, 1, 1],
        behaviour_logprobs=[0.0, -1.0, -1.0],
        prompt_length=1,
        tool_calls=[ToolCall("search_urls", {"query": "x"})],
        answer="Paris",
        format_ok=True,
    )
    return Trajectory(**{**base, **kw})


def test_a_failed_episode_scores_zero_without_asking_the_judge():
    import asyncio

    from rewards.scoring import RewardSpec, score_or_fail
    from rollout.types import Question, Trajectory

    class NoJudge:
        async def judge_answer(self, *a):
            raise AssertionError("a failed episode must not be judged")

    failed = Trajectory.failed("q", 1, RuntimeError("engine died"), token_ids=[1, 2], prompt_length=2)
    for stage in (1, 2):
        question = Question("q", "Capital?", "Paris")
        score = asyncio.run(score_or_fail(failed, question, RewardSpec(stage=stage), NoJudge()))
        assert (score.reward, score.correct, score.judge_source) == (0.0, False, "failed")
        assert score.error == "RuntimeError: engine died"


def test_a_judge_that_raises_fails_that_episode_only():
    import asyncio

    from rewards.scoring import RewardSpec, apply_score, score_or_fail
    from rollout.types import Question

    class BrokenJudge:
        async def judge_answer(self, question, golds, answer):
            if answer == "bad":
                raise RecursionError("maximum recursion depth exceeded")
            from rewards.judge_client import JudgeOutcome

            return JudgeOutcome("correct", True, "llm", 1)

    q = Question("q", "Capital?", "Paris")

    async def both():
        judge = BrokenJudge()
        return await asyncio.gather(*(score_or_fail(_traj(answer=a), q, RewardSpec(), judge) for a in ("bad", "Paris")))

    bad, good = asyncio.run(both())
    assert (bad.reward, bad.judge_source) == (0.0, "error")
    assert bad.error == "RecursionError: maximum recursion depth exceeded"
    assert good.correct and good.reward > 0 and not good.error
    traj = apply_score(_traj(answer="bad"), bad)
    assert traj.error == bad.error and traj.finish_reason == "error" and sum(traj.loss_mask) == 0
