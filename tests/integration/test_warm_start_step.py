"""The warm start's micro-batched step is the whole batch's token-mean NLL: same value, same gradients."""

from __future__ import annotations

import random

import pytest
import torch

from learner.batch import TrainSample, collate
from learner.logprobs import PolicyLogprobs
from learner.loss import masked_mean
from learner.warm_start import batch_token_mean_backward


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    m.config.use_cache = False
    return PolicyLogprobs(m, chunk_size=16)


def _samples(seed: int, n: int) -> list[TrainSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 120)
        prompt = rng.randint(1, length - 1)
        mask = [0] * prompt + [rng.choice([0, 1, 1]) for _ in range(length - prompt)]
        out.append(TrainSample([rng.randrange(10, 4000) for _ in range(length)], mask, None, 0.0))
    return out


def _grads(policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("seed", "micro"), [(0, 1), (1, 2), (2, 3), (3, 8)])
def test_micro_batches_give_the_whole_batchs_token_mean(policy, seed, micro):
    samples = sorted(_samples(seed, 7), key=lambda s: len(s.token_ids))
    policy.zero_grad(set_to_none=True)
    whole = collate(samples, pad_id=0)
    logp, _ = policy(whole.input_ids, whole.attention_mask, whole.targets, whole.target_mask)
    expected = -masked_mean(logp, whole.target_mask)
    expected.backward()
    want = _grads(policy)

    policy.zero_grad(set_to_none=True)
    got = batch_token_mean_backward(policy, samples, pad_id=0, micro_batch_size=micro)
    assert got == pytest.approx(float(expected), rel=1e-5)
    have = _grads(policy)
    assert have.keys() == want.keys() and want
    for name, g in want.items():
        torch.testing.assert_close(have[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_micro_batch_size_is_refused(policy):
    with pytest.raises(ValueError, match="micro_batch_size"):
        batch_token_mean_backward(policy, _samples(0, 2), pad_id=0, micro_batch_size=0)
