"""From scored trajectories to what each learner rank trains on, and padded tensors.

The controller plans a step once (pure, deterministic): which samples go to which rank
in which optimizer mini-batch, and the global token/sequence counts that make the loss a
mean over the whole batch rather than a mean of rank means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainSample:
    token_ids: list[int]
    loss_mask: list[int]
    # None: no usable behaviour policy (a replayed sample treated as on-policy).
    behaviour_logprobs: list[float] | None
    advantage: float
    question_id: str = ""
    replayed: bool = False
    staleness: int = 0

    @property
    def loss_tokens(self) -> int:
        # The first token is never predicted, so its mask does not count.
        return int(sum(self.loss_mask[1:]))


@dataclass
class MiniBatch:
    samples: list[TrainSample]
    # Global over all ranks for this optimizer step.
    global_tokens: int
    global_seqs: int


@dataclass
class RankPlan:
    mini_batches: list[MiniBatch] = field(default_factory=list)


def plan_step(samples: list[TrainSample], world_size: int, mini_batches: int, seed: int) -> list[RankPlan]:
    """Shuffle, cut into optimizer mini-batches, and deal each one over the ranks by token load.

    Every rank gets the same number of sequences per mini-batch (DeepSpeed's fixed micro-batch
    count needs that); within that constraint the longest sequences are spread first.
    """
    n = len(samples)
    if n % (world_size * mini_batches):
        raise ValueError(f"{n} samples do not split into {mini_batches} mini-batches over {world_size} ranks")
    order = np.random.default_rng(seed).permutation(n)
    per_mb = n // mini_batches
    plans = [RankPlan() for _ in range(world_size)]
    for m in range(mini_batches):
        chunk = [samples[i] for i in order[m * per_mb : (m + 1) * per_mb]]
        tokens = sum(s.loss_tokens for s in chunk)
        per_rank = per_mb // world_size
        loads = [0] * world_size
        shards: list[list[TrainSample]] = [[] for _ in range(world_size)]
        for s in sorted(chunk, key=lambda s: -len(s.token_ids)):
            open_ranks = [r for r in range(world_size) if len(shards[r]) < per_rank]
            r = min(open_ranks, key=lambda r: (loads[r], r))
            shards[r].append(s)
            loads[r] += len(s.token_ids)
        for r in range(world_size):
            plans[r].mini_batches.append(MiniBatch(shards[r], tokens, per_mb))
    return plans


@dataclass
class Collated:
    input_ids: "object"  # torch.LongTensor [B, T]
    attention_mask: "object"
    # Shifted by one: position t holds what predicts token t+1.
    targets: "object"
    target_mask: "object"  # bool [B, T-1]
    behaviour_logprobs: "object"  # float [B, T-1]
    has_behaviour: "object"  # bool [B, 1]
    advantages: "object"  # float [B, 1]


def collate(samples: list[TrainSample], pad_id: int):
    import torch

    width = max(len(s.token_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.bool)
    blp = torch.zeros((b, width), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.token_ids)
        ids[i, :n] = torch.tensor(s.token_ids, dtype=torch.long)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.bool)
        if s.behaviour_logprobs is not None:
            blp[i, :n] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
    has = torch.tensor([[s.behaviour_logprobs is not None] for s in samples], dtype=torch.bool)
    adv = torch.tensor([[s.advantage] for s in samples], dtype=torch.float32)
    return Collated(ids, attn, ids[:, 1:], mask[:, 1:], blp[:, 1:], has, adv)
