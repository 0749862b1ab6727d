"""bench/control_plane.py's pure helpers: the projection and the Redis command counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.control_plane import calls_delta, command_calls, overhead_fraction
from bench.sim_rollout_worker import episode_tokens


def test_overhead_is_the_share_of_the_step_the_controller_is_busy():
    assert overhead_fraction(0.001, 512, 60.0) == pytest.approx(512 / 60_000)
    assert overhead_fraction(60 / 512, 512, 60.0) == pytest.approx(1.0)  # the controller is the bottleneck
    with pytest.raises(ValueError, match="step_s"):
        overhead_fraction(0.001, 512, 0.0)


def test_command_counts_from_info_commandstats():
    before = command_calls({"cmdstat_xadd": {"calls": 3, "usec": 10}, "cmdstat_hincrby": {"calls": 5}})
    after = command_calls({"cmdstat_xadd": {"calls": 7}, "cmdstat_hincrby": {"calls": 5},
                           "cmdstat_evalsha": {"calls": 2}})
    assert before == {"xadd": 3, "hincrby": 5}
    assert calls_delta(before, after) == {"xadd": 4, "evalsha": 2}  # unchanged commands are left out, busiest first
    assert list(calls_delta(before, after)) == ["xadd", "evalsha"]


@given(st.integers(1, 25), st.floats(1.0, 5.0), st.integers(64, 8192), st.integers(64, 16384))
def test_episode_length_follows_the_turns_within_bounds(turns, mean_turns, mean_tokens, limit):
    n = episode_tokens(turns, mean_turns, mean_tokens, limit)
    assert 64 <= n <= max(64, limit)
    assert episode_tokens(turns + 1, mean_turns, mean_tokens, limit) >= n
