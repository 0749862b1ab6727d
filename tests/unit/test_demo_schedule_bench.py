"""The demo-schedule Monte Carlo: replay and pruning act exactly when the success rates allow."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.demo_schedule import Rates, Shape, chances, simulate

DEMO_SHAPE = Shape(5, 4, 2, 6, 0.5)


def test_a_policy_that_never_succeeds_stores_nothing_to_replay_and_prunes_nothing():
    c = chances(DEMO_SHAPE, Rates(0.0, 0.0, 0.0, two_hop_hi=0.0), trials=50)
    assert c["replay"] == c["pruning"] == 0.0


def test_a_policy_that_always_succeeds_prunes_and_never_needs_a_replay():
    c = chances(DEMO_SHAPE, Rates(1.0, 1.0, 0.0, two_hop_lo=1.0, two_hop_hi=1.0), trials=50)
    assert c["pruning"] == 1.0 and c["replay"] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 9), st.integers(1, 4), st.integers(2, 4), st.integers(1, 8), st.sampled_from([0.5, 0.75, 0.9]),
       st.floats(0.0, 1.0), st.integers(0, 1000))
def test_pruning_leaves_a_steps_worth_and_injections_only_fill_groups(size, qps, n, steps, thr, rate, seed):
    qps = min(qps, size)
    shape = Shape(size, qps, n, steps, thr)
    rates = Rates(rate, rate, 0.0, two_hop_lo=rate, two_hop_hi=rate)
    injections, pruned = simulate(shape, rates, np.random.default_rng(seed))
    assert 0 <= pruned <= size - qps
    assert 0 <= injections <= steps * qps
