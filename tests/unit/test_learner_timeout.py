"""A learner step slower than learner.timeout_s is answered by a learner restart, not a failed run."""

from __future__ import annotations

import asyncio

import pytest

from cluster.controller import RESTARTS_LEARNER, LearnerTimedOut, within_learner_timeout


async def _step(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "sums"


def test_a_step_past_the_timeout_raises_an_error_the_trainer_restarts_on():
    with pytest.raises(LearnerTimedOut, match=r"training step 3 took longer than learner.timeout_s \(0.05 s\)") as err:
        asyncio.run(within_learner_timeout(_step(30), 0.05, "training step 3"))
    assert isinstance(err.value, RESTARTS_LEARNER)
    assert isinstance(err.value.__cause__, asyncio.TimeoutError)


def test_a_step_within_the_timeout_returns_its_result():
    assert asyncio.run(within_learner_timeout(_step(0), 5, "training step 1")) == "sums"


def test_other_errors_are_not_turned_into_restarts():
    async def broken():
        raise ValueError("bad plan")

    with pytest.raises(ValueError):
        asyncio.run(within_learner_timeout(broken(), 5, "training step 1"))
    assert not isinstance(ValueError(), RESTARTS_LEARNER) and not isinstance(TimeoutError(), RESTARTS_LEARNER)
