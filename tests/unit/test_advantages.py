"""RAPO advantage pieces (docs/rapo.md §3) against hand-worked numbers and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from learner.advantages import (
    SPREAD_TOL,
    advantage_scale,
    batch_advantages,
    good_groups,
    group_advantages,
    plan_replay_injections,
    questions_to_prune,
)

EPS = 1e-6

# ---------------------------------------------------------------- cross-check with peers


def test_matches_verl_cross_check_sample_std() -> None:
    # Worked as verl's compute_grpo_outcome_advantage does (unbiased std, eps added to the std):
    # A = [1,0,0,1]: mean 0.5, sample std sqrt(4·0.25/3) = 0.57735
    # → ±0.5/(0.57735 + 1e-6) = ±0.866024; B = [1,1,1,0]: mean 0.75, std 0.5 → 0.25/0.5 = 0.5,
    # −0.75/0.5 = −1.5 (each shrunk by eps); C = [0.5]×4 → zeros.
    adv = group_advantages(np.array([[1, 0, 0, 1], [1, 1, 1, 0], [0.5] * 4], dtype=float))
    np.testing.assert_allclose(adv[0], 0.5 / (np.sqrt(1 / 3) + EPS) * np.array([1, -1, -1, 1]), rtol=1e-12)
    np.testing.assert_allclose(adv[0], [0.866024, -0.866024, -0.866024, 0.866024], atol=1e-6)
    np.testing.assert_allclose(adv[1], [0.499999, 0.499999, 0.499999, -1.499997], atol=1e-6)
    assert np.array_equal(adv[2], np.zeros(4))


def test_population_std() -> None:
    # Population std of [1,0,0,1] is 0.5 → ±0.5/(0.5 + 1e-6) = ±0.999998;
    # of [1,1,1,0] it is sqrt(3)/4 = 0.4330127 → 0.25/0.4330127 = 0.577350, −0.75/… = −1.732051.
    adv = group_advantages(np.array([[1, 0, 0, 1], [1, 1, 1, 0]], dtype=float), std="population")
    np.testing.assert_allclose(adv[0], [0.999998, -0.999998, -0.999998, 0.999998], atol=1e-6)
    np.testing.assert_allclose(adv[1], [0.577349, 0.577349, 0.577349, -1.732047], atol=1e-6)


def test_singleton_and_flat_groups_are_exactly_zero() -> None:
    # A lone rollout has no baseline; unlike verl we do not pass its raw reward through.
    assert np.array_equal(group_advantages(np.array([[0.7], [0.0]])), np.zeros((2, 1)))
    assert np.array_equal(group_advantages(np.full((2, 5), 0.1), std="population", eps=0.0), np.zeros((2, 5)))


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[groups, rollouts\]"):
        group_advantages(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="no rollouts"):
        group_advantages(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="std must be"):
        group_advantages(np.zeros((1, 2)), std="unbiased")  # type: ignore[arg-type]


# ---------------------------------------------------------------- RAPO batch, hand-worked

# Stage-1 rewards of 3 questions × 4 rollouts: 0.1 = formatted but wrong, 1.0 = correct.
ALL_FAIL = [0.1, 0.1, 0.1, 0.1]
ALL_PASS = [1.0, 1.0, 1.0, 1.0]
MIXED = [1.0, 0.1, 0.1, 1.0]
STORED_REWARD = 1.0  # the replay buffer's correct trajectory for the all-fail question


def test_batch_without_replay() -> None:
    rewards = np.array([ALL_FAIL, ALL_PASS, MIXED])
    adv, factor, n_good = batch_advantages(rewards)
    # Only the mixed group has spread: G = 3, G_good = 1 → scale 3.
    assert (factor, n_good) == (3.0, 1)
    # Mixed: mean 0.55, deviations ±0.45, sample var 4·0.2025/3 = 0.27, std 0.519615
    # → ±0.45/0.519615 = ±0.866025, ×3 = ±2.598076.
    np.testing.assert_allclose(adv[2], 3 * 0.45 / (np.sqrt(0.27) + EPS) * np.array([1, -1, -1, 1]), rtol=1e-12)
    np.testing.assert_allclose(adv[2], [2.598071, -2.598071, -2.598071, 2.598071], atol=1e-6)
    assert np.array_equal(adv[:2], np.zeros((2, 4)))
    # GRPO (no scaling) keeps ±0.866.
    grpo = batch_advantages(rewards, scale=False)
    assert grpo.scale_factor == 1.0 and grpo.n_good == 1
    np.testing.assert_allclose(grpo.advantages[2], adv[2] / 3, rtol=1e-12)


def test_batch_with_replay_injection() -> None:
    correct = np.array([[False] * 4, [True] * 4, [True, False, False, True]])
    plan = plan_replay_injections(correct, [True, True, True], np.random.default_rng(0))
    # Only the all-fail group is injected; the all-pass and mixed groups are left alone.
    assert plan[1:] == [None, None]
    j = plan[0]
    assert j is not None and 0 <= j < 4

    rewards = np.array([ALL_FAIL, ALL_PASS, MIXED])
    rewards[0, j] = STORED_REWARD
    adv, factor, n_good = batch_advantages(rewards)
    # The injected group becomes mixed: G_good 1 → 2, scale 3/1 → 3/2.
    assert (factor, n_good) == (1.5, 2)
    # Injected group [0.1,0.1,0.1,1.0]: mean 0.325, deviations −0.225 ×3 and 0.675,
    # Σd² = 3·0.050625 + 0.455625 = 0.6075, sample var 0.6075/3 = 0.2025, std 0.45
    # → −0.5 and 1.5, ×1.5 → −0.75 and 2.25.
    expected = np.full(4, -0.225)
    expected[j] = 0.675
    np.testing.assert_allclose(adv[0], 1.5 * expected / (0.45 + EPS), rtol=1e-12)
    assert adv[0, j] == pytest.approx(2.25, abs=1e-5)
    assert np.delete(adv[0], j) == pytest.approx([-0.75] * 3, abs=1e-5)
    # The mixed group is now scaled by 1.5 instead of 3: ±0.866025·1.5 = ±1.299038.
    np.testing.assert_allclose(adv[2], [1.299036, -1.299036, -1.299036, 1.299036], atol=1e-6)
    assert np.array_equal(adv[1], np.zeros(4))


def test_advantage_scale_with_no_good_group_is_one() -> None:
    assert advantage_scale(np.array([ALL_FAIL, ALL_PASS])) == 1.0
    adv, factor, n_good = batch_advantages(np.array([ALL_FAIL, ALL_PASS]))
    assert (factor, n_good) == (1.0, 0)
    assert np.array_equal(adv, np.zeros((2, 4)))


def test_replay_needs_a_stored_trajectory_and_bool_input() -> None:
    rng = np.random.default_rng(1)
    assert plan_replay_injections(np.zeros((2, 3), dtype=bool), [False, True], rng)[0] is None
    with pytest.raises(TypeError, match="bool"):
        plan_replay_injections(np.array([[0.1, 0.1]]), [True], rng)  # rewards passed by mistake
    with pytest.raises(ValueError, match="has_stored has 1 entries for 2 groups"):
        plan_replay_injections(np.zeros((2, 3), dtype=bool), [True], rng)


def test_replay_picks_every_member_uniformly_over_draws() -> None:
    rng = np.random.default_rng(7)
    picks = [plan_replay_injections(np.zeros((1, 4), dtype=bool), [True], rng)[0] for _ in range(400)]
    counts = np.bincount(np.array(picks), minlength=4)
    # 100 expected per slot; a 4-sigma band (sd ≈ 8.7) catches a fixed or biased slot.
    assert counts.min() > 65 and counts.max() < 135


# ---------------------------------------------------------------- pruning


def test_questions_to_prune() -> None:
    correct = {"all5": 5, "four5": 4, "nine10": 9, "none": 0, "never_run": 0}
    totals = {"all5": 5, "four5": 5, "nine10": 10, "none": 5, "never_run": 0, "absent": 3}
    # 5/5 = 1.0 ≥ 0.9 prune; 4/5 = 0.8 keep; 9/10 = 0.9 ≥ 0.9 prune (boundary is inclusive);
    # 0/5 keep; total 0 never pruned; a question missing from correct_counts solved 0/3.
    assert questions_to_prune(correct, totals) == {"all5", "nine10"}
    assert questions_to_prune(correct, totals, threshold=0.8) == {"all5", "four5", "nine10"}
    # Capped, the first in id order go; a cap at or below 0 prunes nothing.
    assert questions_to_prune(correct, totals, threshold=0.8, max_prune=2) == {"all5", "four5"}
    assert questions_to_prune(correct, totals, threshold=0.8, max_prune=-1) == set()


@pytest.mark.parametrize("n_total", [10, 20, 30, 50, 70, 90, 100])
def test_prune_boundary_exact_for_many_totals(n_total: int) -> None:
    # 0.9·n correct must hit the threshold exactly, one fewer must not.
    k = n_total * 9 // 10
    assert questions_to_prune({"q": k}, {"q": n_total}) == {"q"}
    assert questions_to_prune({"q": k - 1}, {"q": n_total}) == set()


def test_prune_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="6 correct out of 5"):
        questions_to_prune({"q": 6}, {"q": 5})
    with pytest.raises(ValueError, match="without a total"):
        questions_to_prune({"q": 1}, {})
    with pytest.raises(ValueError, match="threshold"):
        questions_to_prune({}, {}, threshold=0.0)


# ---------------------------------------------------------------- properties

reward_values = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False)
# Realistic batches: rewards from the stage-1/stage-2 value set, so flat groups are common.
reward_levels = st.sampled_from([0.0, 0.1, 0.5, 0.6, 0.9, 1.0, 1.1])


def reward_matrices(elements: st.SearchStrategy[float] = reward_values) -> st.SearchStrategy[np.ndarray]:
    shapes = st.tuples(st.integers(1, 8), st.integers(2, 8))
    return shapes.flatmap(lambda s: hnp.arrays(np.float64, s, elements=elements))


@given(hnp.arrays(np.float64, st.integers(2, 16), elements=reward_values))
def test_good_group_advantages_sum_to_zero_and_have_unit_sample_std(row: np.ndarray) -> None:
    assume(np.ptp(row) > SPREAD_TOL)
    adv = group_advantages(row[None, :])[0]
    assert abs(adv.sum()) <= 1e-9 * len(row) * max(1.0, np.abs(adv).max())
    s = row.std(ddof=1)
    # Exactly s/(s + eps); ≈ 1 whenever the spread dwarfs eps.
    assert adv.std(ddof=1) == pytest.approx(s / (s + EPS), rel=1e-9)
    if s > 1e-2:
        assert adv.std(ddof=1) == pytest.approx(1.0, abs=1e-4)


@given(hnp.arrays(np.float64, st.integers(2, 16), elements=reward_values))
def test_population_std_gives_unit_population_std(row: np.ndarray) -> None:
    assume(row.std() > 1e-2)
    adv = group_advantages(row[None, :], std="population")[0]
    assert adv.std() == pytest.approx(1.0, abs=1e-4)


@given(st.one_of(reward_matrices(), reward_matrices(reward_levels)), st.booleans())
def test_scaling_multiplies_by_exactly_g_over_g_good(rewards: np.ndarray, population: bool) -> None:
    std = "population" if population else "sample"
    g = rewards.shape[0]
    g_good = int(sum(np.ptp(row) > SPREAD_TOL for row in rewards))  # independent count
    raw = group_advantages(rewards, std=std)
    adv, factor, n_good = batch_advantages(rewards, std=std)
    assert n_good == g_good
    assert factor == (g / g_good if g_good else 1.0)
    assert np.array_equal(adv, raw * factor)
    # Bad groups are exactly zero; good groups are not.
    nonzero_rows = np.abs(raw).max(axis=1) > 0
    assert np.array_equal(nonzero_rows, good_groups(rewards))


@given(
    st.tuples(st.integers(1, 10), st.integers(1, 8)).flatmap(
        lambda s: st.tuples(hnp.arrays(np.bool_, s), hnp.arrays(np.bool_, s[0]), st.integers(0, 2**32 - 1))
    )
)
def test_injections_only_into_all_fail_groups_with_a_stored_trajectory(
    case: tuple[np.ndarray, np.ndarray, int],
) -> None:
    correct, has_stored, seed = case
    plan = plan_replay_injections(correct, list(has_stored), np.random.default_rng(seed))
    assert len(plan) == correct.shape[0]
    for g, j in enumerate(plan):
        if not correct[g].any() and has_stored[g]:
            assert j is not None and 0 <= j < correct.shape[1]
        else:
            assert j is None
    # Same seed, same plan: injections are reproducible.
    assert plan == plan_replay_injections(correct, list(has_stored), np.random.default_rng(seed))


@given(st.integers(1, 8), st.integers(2, 8), st.integers(0, 2**32 - 1))
def test_injection_makes_all_fail_groups_good(n_groups: int, n: int, seed: int) -> None:
    # Stage-1 rewards of all-fail groups are ≤ 0.1, a stored correct one is ≥ 0.9:
    # after injection every injected group has spread and counts in G_good.
    rng = np.random.default_rng(seed)
    rewards = rng.choice([0.0, 0.1], size=(n_groups, n))
    plan = plan_replay_injections(np.zeros((n_groups, n), dtype=bool), [True] * n_groups, rng)
    for g, j in enumerate(plan):
        assert j is not None
        rewards[g, j] = 1.0
    assert batch_advantages(rewards).n_good == n_groups
    assert advantage_scale(rewards) == 1.0
