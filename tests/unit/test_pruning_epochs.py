"""When an epoch may be judged for pruning: only once every draw of it is scored, whatever is re-run or retried.

The events are the controller's: a draw (`_draw`), a group scored and assembled
(`_record_pruning`), a scored group dropped as too stale and re-run under id + "r", a group
retried under its own id after a failure that followed its assembly.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from learner.pruning import EpochLedger, draw_id
from learner.scheduler import PromptScheduler


def _draws(ledger: EpochLedger, sched: PromptScheduler, n: int, start: int = 1) -> list[tuple[str, int]]:
    out = []
    for i in range(start, start + n):
        d = sched.next_batch(1)
        epoch = d.epochs[d.ids[0]]
        ledger.drawn(epoch, f"g{i}", d.ended)
        out.append((f"g{i}", epoch))
    return out


def test_a_rerun_after_a_staleness_drop_does_not_close_the_epoch_early():
    ledger, sched = EpochLedger(), PromptScheduler(["a", "b", "c"], 0)
    (g1, e), (g2, _), (g3, _) = _draws(ledger, sched, 3)
    assert ledger.ended == {0}
    ledger.settle(e, g1)
    ledger.settle(e, g2)
    ledger.settle(e, g1 + "r")  # g1 was dropped as too stale, re-run and scored again
    ledger.settle(e, g1 + "rr")  # and again
    assert ledger.closable() == []  # g3 is not scored yet
    ledger.settle(e, g3)
    assert ledger.closable() == [0]


def test_a_retry_after_a_failure_following_assembly_does_not_close_the_epoch_early():
    ledger, sched = EpochLedger(), PromptScheduler(["a", "b"], 0)
    (g1, e), (g2, _) = _draws(ledger, sched, 2)
    assert ledger.settle(e, g1)
    assert not ledger.settle(e, g1)  # publishing failed after assembly: the same group ran again
    assert ledger.closable() == []
    assert ledger.settle(e, g2)
    assert ledger.closable() == [0]
    ledger.closed(0)
    assert ledger.closable() == []


def test_epochs_close_oldest_first():
    ledger, sched = EpochLedger(), PromptScheduler(["a", "b"], 0)
    draws = _draws(ledger, sched, 4)
    assert ledger.ended == {0, 1}
    for g, e in draws[1:]:
        ledger.settle(e, g)
    # Epoch 1 is all scored but epoch 0 still waits for g1: judging 1 first would skip 0 for good
    # (PruningState.finish_epoch only moves forward).
    assert ledger.closable() == []
    g1, e1 = draws[0]
    ledger.settle(e1, g1)
    assert ledger.closable() == [0, 1]


# Per step: draw some groups, then score some of those not yet scored, and re-run or retry some scored ones.
EVENTS = st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(0, 30), max_size=4), st.lists(st.integers(0, 30), max_size=3),
              st.booleans()),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 20), events=EVENTS)
def test_an_epoch_closes_once_exactly_when_all_its_draws_are_scored(n, seed, events):
    ledger, sched = EpochLedger(), PromptScheduler([f"q{i}" for i in range(n)], seed)
    epoch_of: dict[str, int] = {}
    unscored: list[str] = []
    scored: list[str] = []
    closed: list[int] = []
    for k, (draws, to_score, to_repeat, checkpoint) in enumerate(events):
        for g, e in _draws(ledger, sched, draws, start=len(epoch_of) + 1):
            epoch_of[g] = e
            unscored.append(g)
        for i in to_score:
            if unscored:
                g = unscored.pop(i % len(unscored))
                ledger.settle(epoch_of[g], g)
                scored.append(g)
        for i in to_repeat:
            if scored:
                g = scored[i % len(scored)]
                ledger.settle(epoch_of[g], g + "r" * (k % 3))  # a re-run ("r") or a retry (same id)
        for e in ledger.closable():
            assert all(epoch_of[g] != e for g in unscored), f"epoch {e} closed with {unscored} unscored"
            ledger.closed(e)
            closed.append(e)
        if checkpoint:
            ledger = EpochLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert closed == sorted(set(closed))  # each once, oldest first
    # Every ended epoch whose draws (and all earlier epochs' draws) are scored has closed.
    oldest_waiting = min((epoch_of[g] for g in unscored), default=sched.state.epoch)
    assert closed == list(range(min(oldest_waiting, sched.state.epoch)))


def test_draw_id_is_the_drawn_group_for_its_reruns():
    assert draw_id("g12") == draw_id("g12r") == draw_id("g12rr") == "g12"
