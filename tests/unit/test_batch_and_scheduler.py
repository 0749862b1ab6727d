from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.batch import TrainSample, collate, padding_fraction, plan_step
from learner.loss import aggregate
from learner.scheduler import PromptScheduler, SchedulerState


def _sample(n_tokens: int, n_loss: int, tag: str = "") -> TrainSample:
    mask = [0] * (n_tokens - n_loss) + [1] * n_loss
    return TrainSample(list(range(n_tokens)), mask, [-0.1 * m for m in mask], advantage=1.0, question_id=tag)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(3, 60), min_size=1, max_size=8),
    world=st.sampled_from([1, 2, 4]),
    minis=st.sampled_from([1, 2]),
    seed=st.integers(0, 100),
)
def test_plan_deals_every_sample_once_with_global_counts(lengths, world, minis, seed):
    n = world * minis * len(lengths)
    samples = [_sample(lengths[i % len(lengths)], 1 + i % 2, str(i)) for i in range(n)]
    plans = plan_step(samples, world, minis, seed)
    dealt = [s.question_id for p in plans for mb in p.mini_batches for s in mb.samples]
    assert Counter(dealt) == Counter(s.question_id for s in samples)
    for m in range(minis):
        mbs = [p.mini_batches[m] for p in plans]
        assert len({len(mb.samples) for mb in mbs}) == 1  # equal sequence counts per rank
        tokens = sum(s.loss_tokens for mb in mbs for s in mb.samples)
        assert all(mb.global_tokens == tokens and mb.global_seqs == n // minis for mb in mbs)


def _per_token_values(s: TrainSample) -> list[float]:
    # Any fixed function of the sample: what matters is that each token keeps its value whatever the split.
    return [((t * 37 + len(s.token_ids)) % 23) / 7.0 - 1.5 for t in range(len(s.token_ids) - 1)]


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 300), min_size=1, max_size=12),
    world=st.sampled_from([1, 2, 3, 4]),
    minis=st.sampled_from([1, 2]),
    budget=st.integers(16, 700),
    seed=st.integers(0, 100),
)
def test_token_budget_plan_keeps_the_global_mean(lengths, world, minis, budget, seed):
    n = world * minis * len(lengths)
    lens = [lengths[i % len(lengths)] for i in range(n)]
    samples = [_sample(lens[i], 1 + i % min(3, lens[i] - 1), str(i)) for i in range(n)]
    plans = plan_step(samples, world, minis, seed, max_tokens=budget)
    dealt = [s.question_id for p in plans for mb in p.mini_batches for micro in mb.micro_batches for s in micro]
    assert Counter(dealt) == Counter(s.question_id for s in samples)
    for m in range(minis):
        mbs = [p.mini_batches[m] for p in plans]
        # Every rank runs the same number of micro-batches (ZeRO collectives), within the budget
        # unless a micro-batch holds one sequence longer than it.
        assert len({len(mb.micro_batches) for mb in mbs}) == 1
        for mb in mbs:
            assert sorted(s.question_id for micro in mb.micro_batches for s in micro) == sorted(
                s.question_id for s in mb.samples
            )
            for micro in mb.micro_batches:
                assert len(micro) <= 1 or sum(len(s.token_ids) for s in micro) <= budget
        # The loss summed over every micro-batch of every rank is the mean over the whole mini-batch.
        chunk = [s for mb in mbs for s in mb.samples]
        for mode, norm in (("token-mean", max(mbs[0].global_tokens, 1)), ("seq-mean-token-mean", mbs[0].global_seqs)):
            whole = collate(chunk, pad_id=0)
            values = torch.zeros(whole.target_mask.shape, dtype=torch.float64)
            for i, s in enumerate(chunk):
                values[i, : len(s.token_ids) - 1] = torch.tensor(_per_token_values(s), dtype=torch.float64)
            expected = aggregate(values, whole.target_mask, mode, norm)
            total = 0.0
            for mb in mbs:
                for micro in mb.micro_batches:
                    if not micro:
                        continue
                    part = collate(micro, pad_id=0, packed=True)
                    vals = torch.zeros(part.target_mask.shape, dtype=torch.float64)
                    for i, s in enumerate(micro):
                        vals[i, : len(s.token_ids) - 1] = torch.tensor(_per_token_values(s), dtype=torch.float64)
                    total += float(aggregate(vals, part.target_mask, mode, norm))
            assert total == pytest.approx(float(expected), rel=1e-9, abs=1e-9)


def test_token_budget_balances_ranks_by_tokens_and_pads_with_empty_micro_batches():
    # One long sequence and many short ones: by counts one rank would get 3 sequences of 1000+ tokens.
    samples = [_sample(n, 1, str(i)) for i, n in enumerate([1000, 100, 100, 100, 100, 100, 100, 100])]
    plans = plan_step(samples, 2, 1, 0, max_tokens=400)
    loads = sorted(sum(len(s.token_ids) for s in p.mini_batches[0].samples) for p in plans)
    assert loads == [700, 1000]
    counts = [len(p.mini_batches[0].micro_batches) for p in plans]
    assert counts == [2, 2]  # the short rank needs 2; the long one gets its 1000 alone plus an empty one
    long_rank = next(p for p in plans if len(p.mini_batches[0].samples) == 1)
    assert [len(m) for m in long_rank.mini_batches[0].micro_batches] == [1, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        plan_step(samples, 2, 1, 0, max_tokens=0)


def test_padding_fraction():
    short, long = _sample(10, 1), _sample(30, 1)
    assert padding_fraction([[short, long]], packed=False) == pytest.approx(1 - 40 / 60)
    assert padding_fraction([[short, long]], packed=True) == 0.0
    assert padding_fraction([[short], [long], []], packed=False) == 0.0


def test_plan_is_deterministic_and_refuses_uneven_splits():
    samples = [_sample(10 + i, 3, str(i)) for i in range(8)]
    a = [[s.question_id for mb in p.mini_batches for s in mb.samples] for p in plan_step(samples, 2, 2, 7)]
    b = [[s.question_id for mb in p.mini_batches for s in mb.samples] for p in plan_step(samples, 2, 2, 7)]
    assert a == b
    with pytest.raises(ValueError):
        plan_step(samples[:7], 2, 1, 0)


def test_plan_balances_tokens_over_ranks():
    samples = [_sample(n, 1, str(n)) for n in (100, 90, 12, 10)]
    plans = plan_step(samples, 2, 1, 0)
    loads = [sum(len(s.token_ids) for s in p.mini_batches[0].samples) for p in plans]
    assert sorted(loads) == [102, 110]  # 100+10 and 90+12, not 100+90 and 12+10


def test_collate_shifts_targets_and_masks():
    s = TrainSample([5, 6, 7, 8], [0, 0, 1, 1], [0, 0, -0.5, -0.25], advantage=2.0)
    t = _sample(2, 1)
    batch = collate([s, t], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [0, 1, 0, 0]]
    assert batch.targets.tolist()[0] == [6, 7, 8]
    assert batch.target_mask.tolist() == [[False, True, True], [True, False, False]]
    assert batch.behaviour_logprobs.tolist()[0] == [0.0, -0.5, -0.25]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.advantages.tolist() == [[2.0], [1.0]]


def test_scheduler_covers_an_epoch_before_repeating():
    ids = [f"q{i}" for i in range(10)]
    sched = PromptScheduler(ids, seed=3)
    seen = []
    ended = []
    for _ in range(5):
        draw = sched.next_batch(4)
        assert len(set(draw.ids)) == 4
        seen.append(draw.ids)
        ended.append(draw.ended)
        assert set(draw.epochs) == set(draw.ids)
    first_epoch = seen[0] + seen[1] + seen[2][:2]
    assert sorted(first_epoch) == sorted(ids)
    assert ended[:3] == [[], [], [0]]
    assert [e for e in ended if e][1] == [1]


def test_scheduler_resumes_from_its_state_and_skips_pruned():
    ids = [f"q{i}" for i in range(12)]
    a = PromptScheduler(ids, seed=1)
    a.next_batch(5)
    state = SchedulerState(**vars(a.state))
    b = PromptScheduler(ids, seed=1, state=state)
    assert a.next_batch(3) == b.next_batch(3)
    b.prune({"q0", "q1"})
    for _ in range(6):
        assert not {"q0", "q1"} & set(b.next_batch(4).ids)
    with pytest.raises(ValueError, match="active questions"):
        PromptScheduler(["a", "b"], 0, SchedulerState(pruned=["a"])).next_batch(2)


def test_scheduler_draws_one_at_a_time_like_a_fresh_scheduler_after_prunes():
    """The epoch order is remembered between draws; a prune (or a restored state) must still be
    seen at once: every draw equals that of a scheduler rebuilt from the same state."""
    import copy

    ids = [f"q{i}" for i in range(40)]
    kept = PromptScheduler(ids, seed=3)
    for n in range(120):
        if n in (10, 55, 90):
            kept.prune({kept.next_batch(1).ids[0], f"q{n % 40}"})
        fresh = PromptScheduler(ids, seed=3, state=copy.deepcopy(kept.state))
        a, b = kept.next_batch(1), fresh.next_batch(1)
        assert (a.ids, a.epochs, a.ended) == (b.ids, b.epochs, b.ended)
        assert a.ids[0] not in kept.state.pruned
