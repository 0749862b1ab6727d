"""bench/judge_pool.py's capacity attribution (the --timeline view): a pure function of the server's call records."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.judge_pool import CallRecord, attribute_capacity


def test_a_full_run_has_no_idle_capacity():
    calls = [CallRecord(0.0, True, "a"), CallRecord(0.0, True, "b"), CallRecord(1.0, True, "c"),
             CallRecord(1.0, True, "d")]
    loss = attribute_capacity(calls, latency=1.0, slots=2, start=0.0, end=2.0, full_at=0.0)
    assert (loss.capacity, loss.busy) == (4.0, 4.0)
    assert loss.ramp == loss.tail == loss.middle == loss.backoff == 0.0
    assert loss.middle_window == (0.0, 1.0)


def test_idle_slots_are_split_into_ramp_middle_and_tail():
    # Two slots, latency 1: "a" fails at 0 and is retried at 2.5 (a 1.5 s backoff); "b" and "c" run back to back.
    calls = [CallRecord(0.0, False, "a"), CallRecord(0.5, True, "b"), CallRecord(1.5, True, "c"),
             CallRecord(2.5, True, "a")]
    loss = attribute_capacity(calls, latency=1.0, slots=2, start=0.0, end=3.5, client_call_s=1.1)
    assert loss.busy == pytest.approx(4.0)
    assert loss.ramp == pytest.approx(0.5)  # [0, 1): slot 2 idle until "b" at 0.5
    assert loss.middle_window == (1.0, 1.5)  # from one latency in to the last first call ("c" at 1.5)
    assert loss.middle == pytest.approx(1.0 - 0.5)  # [1, 1.5): 2 slots, only "b" busy
    assert loss.tail == pytest.approx(4.0 - 2.0)  # [1.5, 3.5): "c", then the retry of "a", on one slot
    assert loss.backoff == pytest.approx(0.5)  # "a" waits from 1.0 to 2.5; the middle sees 0.5 of it
    assert loss.client_overhead == pytest.approx(0.1 * 2)  # calls ending in the middle: "a" (1.0) and "b" (1.5)
    assert loss.dispatch_gap == pytest.approx(loss.middle - loss.client_overhead)
    assert loss.middle_ok == 1


@given(st.lists(st.tuples(st.floats(0, 10), st.booleans(), st.integers(0, 20)), min_size=1, max_size=40),
       st.integers(1, 8), st.floats(0.05, 2))
def test_the_parts_add_up_to_the_capacity(raw, slots, latency):
    calls = [CallRecord(at, ok, f"p{p}") for at, ok, p in raw]
    end = max(c.at for c in calls) + latency
    loss = attribute_capacity(calls, latency, slots, 0.0, end)
    assert loss.busy + loss.ramp + loss.middle + loss.tail == pytest.approx(loss.capacity)
    assert loss.middle_window[0] <= loss.middle_window[1]
    assert loss.backoff >= 0 and loss.dispatch_gap >= 0


def test_an_empty_window_is_refused():
    with pytest.raises(ValueError, match="end > start"):
        attribute_capacity([], 0.2, 4, 1.0, 1.0)
