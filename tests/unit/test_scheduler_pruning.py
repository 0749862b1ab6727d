"""Prunes that land while an epoch is being drawn: each epoch still draws every question it keeps exactly once.

The controller draws one question at a time (`next_batch(1)`) and prunes whenever an earlier
epoch closes, which can be in the middle of a later epoch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from learner.scheduler import PromptScheduler, SchedulerState

OPS = st.lists(
    st.one_of(
        st.just(("draw",)),
        st.tuples(st.just("prune"), st.sets(st.integers(0, 11), max_size=3)),
        st.just(("resume",)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 50), ops=OPS)
def test_prunes_between_draws_never_repeat_or_skip_a_question_within_an_epoch(n, seed, ops):
    ids = [f"q{i}" for i in range(n)]
    sched = PromptScheduler(ids, seed)
    drawn: dict[int, list[str]] = defaultdict(list)
    for op in ops:
        if op[0] == "draw":
            draw = sched.next_batch(1)
            (q,) = draw.ids
            assert q not in sched.state.pruned
            drawn[draw.epochs[q]].append(q)
            for e in draw.ended:
                # Every question not pruned by the time its epoch ended was drawn in it, once.
                kept = set(ids) - set(sched.state.pruned)
                assert kept <= set(drawn[e]), (e, sorted(kept - set(drawn[e])))
        elif op[0] == "prune":
            cut = {ids[i] for i in op[1] if i < n}
            if sched.active - len(cut - set(sched.state.pruned)) >= 1:
                sched.prune(cut)
        else:  # a checkpoint and a resume: the state goes through JSON into a new scheduler
            state = SchedulerState(**json.loads(json.dumps(asdict(sched.state))))
            sched = PromptScheduler(ids, seed, state)
        for e, qs in drawn.items():
            assert len(qs) == len(set(qs)), f"epoch {e} drew {qs}"


def test_a_prune_mid_epoch_keeps_the_rest_of_that_epochs_order():
    ids = [f"q{i}" for i in range(8)]
    plain, pruned = PromptScheduler(ids, 5), PromptScheduler(ids, 5)
    first = [plain.next_batch(1).ids[0] for _ in range(3)]
    assert [pruned.next_batch(1).ids[0] for _ in range(3)] == first
    rest = [plain.next_batch(1).ids[0] for _ in range(5)]
    gone = {rest[0], first[0]}  # one still to come this epoch, one already drawn
    pruned.prune(gone)
    # The same order from the same place, minus the pruned question; the epoch then ends.
    draws = [pruned.next_batch(1) for _ in range(4)]
    assert [d.ids[0] for d in draws] == rest[1:]
    assert [d.ended for d in draws] == [[], [], [], [0]]
