"""Per-step RAPO metrics: good groups, the scale factor, injections, pruning and what it saved."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.run_metrics import episodes_saved_by_pruning, rapo_per_step, rapo_step_metrics, step_metrics
from learner.groups import ScoredGroup
from rollout.types import Trajectory


def test_step_metrics_hand_worked():
    rewards = np.array([[1.0, 0.1, 0.1, 0.1],   # replayed success: good
                        [0.1, 0.1, 0.1, 0.1],   # all fail, nothing stored: bad
                        [1.0, 1.0, 1.0, 1.0],   # all solved: bad
                        [1.0, 0.1, 1.0, 0.1]])  # good
    replayed = np.zeros_like(rewards, dtype=bool)
    replayed[0, 0] = True
    m = rapo_step_metrics(rewards, replayed, scaling=True, pruned_at={"q1": 0, "q2": 1}, last_epoch_drawn=3)
    assert m["rapo/good_groups"] == 2 and m["rapo/groups"] == 4
    assert m["rapo/scale_factor"] == 2.0  # G / G_good = 4 / 2
    assert m["rapo/injections"] == 1 and m["rapo/pruned_questions"] == 2
    # q1 skipped in epochs 1, 2, 3 and q2 in 2, 3: 5 groups of 4 rollouts.
    assert m["rapo/episodes_saved_by_pruning"] == 20
    off = rapo_step_metrics(rewards, replayed, scaling=False, pruned_at={}, last_epoch_drawn=0)
    assert off["rapo/scale_factor"] == 1 and off["rapo/replay_staleness"] == 0
    lagged = rapo_step_metrics(rewards, replayed, scaling=True, pruned_at={}, last_epoch_drawn=0, replay_lags=[2, 5])
    assert lagged["rapo/replay_staleness"] == 3.5


def test_per_step_table_for_the_summary():
    history = [{"step": 1, "reward/mean": 0.2, "rapo/good_groups": 2.0, "rapo/scale_factor": 2.0,
                "rapo/injections": 0.0, "rapo/pruned_questions": 0.0, "rapo/episodes_saved_by_pruning": 0.0},
               {"step": 2, "reward/mean": 0.3}]
    assert rapo_per_step(history) == [
        {"step": 1, "good_groups": 2.0, "scale_factor": 2.0, "injections": 0.0, "pruned_questions": 0.0,
         "episodes_saved_by_pruning": 0.0},
        {"step": 2},
    ]


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same"):
        rapo_step_metrics(np.zeros((2, 4)), np.zeros((2, 3), dtype=bool), scaling=True, pruned_at={},
                          last_epoch_drawn=0)


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.integers(0, 10), max_size=20), st.integers(0, 12),
       st.integers(2, 8))
def test_saved_episodes_grow_with_epochs_and_never_count_the_pruning_epoch(pruned_at, last, n):
    saved = episodes_saved_by_pruning(pruned_at, last, n)
    assert saved % n == 0 and saved >= 0
    assert episodes_saved_by_pruning(pruned_at, last + 1, n) >= saved
    # Drawn no further than the epoch a question was pruned after: nothing saved yet.
    assert episodes_saved_by_pruning({q: last for q in pruned_at}, last, n) == 0


@given(st.integers(1, 8), st.integers(2, 6), st.data())
def test_scale_factor_is_groups_over_good_groups(groups, n, data):
    rewards = np.array(data.draw(st.lists(st.lists(st.sampled_from([0.0, 0.1, 1.0]), min_size=n, max_size=n),
                                          min_size=groups, max_size=groups)))
    m = rapo_step_metrics(rewards, np.zeros_like(rewards, dtype=bool), scaling=True, pruned_at={}, last_epoch_drawn=0)
    good = sum(len(set(row)) > 1 for row in rewards.tolist())
    assert m["rapo/good_groups"] == good
    assert m["rapo/scale_factor"] == (groups / good if good else 1.0)


def _episode(correct: bool, tokens: int, replayed: bool = False) -> Trajectory:
    t = Trajectory("q", 0, [1] * (tokens + 2), [0, 0] + [1] * tokens, [0.0] * (tokens + 2), 2)
    t.correct, t.reward, t.replayed = correct, 1.0 if correct else 0.0, replayed
    return t


def test_train_metrics_describe_the_fresh_episodes_and_rewards_the_trained_batch():
    # An all-fail group with a replayed success injected, and a fresh group with one success of two.
    groups = [ScoredGroup("q1", [_episode(True, 40, replayed=True), _episode(False, 10)]),
              ScoredGroup("q2", [_episode(True, 10), _episode(False, 10)])]
    m = step_metrics(1, 1, groups, {}, {})
    assert m["train/accuracy"] == pytest.approx(1 / 3)  # not 2/4: the replay is an older policy's success
    assert m["train/episode_tokens"] == 12
    assert m["reward/mean"] == 0.5  # what the learner trained on, the replay included
