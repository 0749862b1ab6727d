"""Packed and padded micro-batches on a tiny real model: the same logprobs, entropy, loss and gradients.

Packing puts a micro-batch's samples in one row with positions restarting per sample; attention
must stay inside each sample (a block-diagonal mask under sdpa/eager). If it leaked across
samples, or a position id or target were off by one at a boundary, logprobs would differ.
"""

from __future__ import annotations

import random

import pytest
import torch

from learner.batch import TrainSample, collate
from learner.logprobs import PolicyLogprobs, varlen_kwargs
from learner.loss import aggregate, ppo_token_loss


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m


def _samples(seed: int, n: int) -> list[TrainSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([2, 3, rng.randint(5, 30), rng.randint(60, 140)])
        prompt = rng.randint(1, length - 1)
        ids = [rng.randrange(10, 4000) for _ in range(length)]
        mask = [0] * prompt + [rng.choice([0, 1, 1]) for _ in range(length - prompt)]
        behaviour = None if rng.random() < 0.2 else [rng.uniform(-9, -1) for _ in range(length)]
        out.append(TrainSample(ids, mask, behaviour, advantage=rng.uniform(-2, 2)))
    return out


def _loss_and_grads(policy, batch, mode: str, normalizer: int):
    policy.zero_grad(set_to_none=True)
    logp, entropy = policy(**batch.model_inputs("cpu"))
    old = logp.detach() - 0.05  # ratios away from 1, so the clip acts on some tokens
    terms = ppo_token_loss(logp, old, batch.advantages, 0.2, 0.28)
    per_token = terms.loss - 0.01 * entropy
    loss = aggregate(per_token, batch.target_mask, mode, normalizer)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), loss.detach(), grads


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_packed_and_padded_agree(model, seed, mode):
    samples = _samples(seed, n=5)
    # Chunks smaller than the loss positions: the chunked LM head is exercised across samples.
    policy = PolicyLogprobs(model, chunk_size=16)
    padded = collate(samples, pad_id=0)
    packed = collate(samples, pad_id=0, packed=True)
    assert packed.input_ids.shape == (1, sum(len(s.token_ids) for s in samples))
    normalizer = max(sum(s.loss_tokens for s in samples), 1) if mode == "token-mean" else len(samples)
    lp_a, ent_a, loss_a, grads_a = _loss_and_grads(policy, padded, mode, normalizer)
    lp_b, ent_b, loss_b, grads_b = _loss_and_grads(policy, packed, mode, normalizer)
    mask = padded.target_mask
    assert torch.equal(mask, packed.target_mask)
    assert (lp_a[mask] - lp_b[mask]).abs().max().item() < 1e-5
    assert (ent_a[mask] - ent_b[mask]).abs().max().item() < 1e-5
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_attention_stays_inside_each_sample(model):
    """A sample's logprobs do not depend on what it is packed with (the mask really is block-diagonal)."""
    policy = PolicyLogprobs(model, chunk_size=64)
    first, other = _samples(7, 2)
    alone = collate([first], pad_id=0, packed=True)
    with torch.no_grad():
        lp_alone, _ = policy(**alone.model_inputs("cpu"))
        for neighbour in (other, TrainSample([5] * 50, [1] * 50, None, 1.0)):
            lp_pair, _ = policy(**collate([neighbour, first], pad_id=0, packed=True).model_inputs("cpu"))
            n = len(first.token_ids) - 1
            assert (lp_pair[1, :n] - lp_alone[0, :n]).abs().max().item() < 1e-5


def test_packed_layout():
    a = TrainSample([5, 6, 7], [0, 1, 1], [0.0, -0.5, -0.25], advantage=2.0)
    b = TrainSample([8, 9], [0, 1], None, advantage=-1.0)
    batch = collate([a, b], pad_id=0, packed=True)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.attention_mask is None
    # Row position predicting each padded-layout target: a's 6 and 7 from 0 and 1, b's 9 from 3.
    assert batch.packed_index[0].tolist() == [0, 1]
    assert batch.packed_index[1, 0].item() == 3
    assert batch.targets.tolist() == [[6, 7], [9, 0]]
    assert batch.target_mask.tolist() == [[True, True], [True, False]]
    assert batch.has_behaviour.tolist() == [[True], [False]]


def test_varlen_kwargs_of_a_packed_row():
    # What flash-attention's variable-length kernels get on GPU: sequence starts and the longest length.
    kw = varlen_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 4
