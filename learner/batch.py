"""From scored trajectories to what each learner rank trains on, and the tensors of a micro-batch.

The controller plans a step once (pure, deterministic): which samples go to which rank
in which optimizer mini-batch (and, with a token budget, in which micro-batch), and the global
token/sequence counts that make the loss a mean over the whole batch rather than a mean of rank
means. A micro-batch becomes tensors either padded (one row per sample) or packed (all samples in
one row, positions restarting per sample, attention kept inside each sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainSample:
    # Lists, or numpy arrays (int32, uint8, float32) as trajectories come from the group stream.
    token_ids: list[int] | np.ndarray
    loss_mask: list[int] | np.ndarray
    # None: no usable behaviour policy (a replayed sample treated as on-policy).
    behaviour_logprobs: list[float] | np.ndarray | None
    advantage: float
    question_id: str = ""
    replayed: bool = False
    staleness: int = 0

    @property
    def loss_tokens(self) -> int:
        # The first token is never predicted, so its mask does not count.
        # count_nonzero, not sum: a packed (uint8) mask would wrap at 256.
        return int(np.count_nonzero(np.asarray(self.loss_mask[1:])))


@dataclass
class MiniBatch:
    samples: list[TrainSample]
    # Global over all ranks for this optimizer step.
    global_tokens: int
    global_seqs: int
    # This rank's micro-batches when the plan cut them by a token budget (the samples above, regrouped;
    # an empty one only keeps the ranks' collectives in step). Empty: cut by learner.micro_batch_size.
    micro_batches: list[list[TrainSample]] = field(default_factory=list)

    def micro(self, micro_batch_size: int) -> list[list[TrainSample]]:
        if self.micro_batches:
            return self.micro_batches
        return [self.samples[i : i + micro_batch_size] for i in range(0, len(self.samples), micro_batch_size)]


@dataclass
class RankPlan:
    mini_batches: list[MiniBatch] = field(default_factory=list)


def plan_step(
    samples: list[TrainSample], world_size: int, mini_batches: int, seed: int, max_tokens: int | None = None
) -> list[RankPlan]:
    """Shuffle, cut into optimizer mini-batches, and deal each one over the ranks by token load.

    Without ``max_tokens`` every rank gets the same number of sequences per mini-batch (the
    trainer cuts them into micro-batches of learner.micro_batch_size); within that constraint the
    longest sequences are spread first. With ``max_tokens`` the ranks are balanced by tokens alone
    and each rank's share is cut into micro-batches of at most ``max_tokens`` tokens (a longer
    sequence gets one to itself), the same number on every rank (see ``token_budget_micro_batches``).
    """
    n = len(samples)
    if n % (world_size * mini_batches):
        raise ValueError(f"{n} samples do not split into {mini_batches} mini-batches over {world_size} ranks")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = np.random.default_rng(seed).permutation(n)
    per_mb = n // mini_batches
    plans = [RankPlan() for _ in range(world_size)]
    for m in range(mini_batches):
        chunk = [samples[i] for i in order[m * per_mb : (m + 1) * per_mb]]
        tokens = sum(s.loss_tokens for s in chunk)
        per_rank = per_mb // world_size if max_tokens is None else per_mb
        shards = _deal(chunk, world_size, per_rank)
        micro = token_budget_micro_batches(shards, max_tokens) if max_tokens is not None else [[] for _ in shards]
        for r in range(world_size):
            plans[r].mini_batches.append(MiniBatch(shards[r], tokens, per_mb, micro[r]))
    return plans


def _deal(chunk: list[TrainSample], bins: int, capacity: int) -> list[list[TrainSample]]:
    """Longest first onto the least-loaded bin with room (LPT): close to the best token balance."""
    loads = [0] * bins
    shards: list[list[TrainSample]] = [[] for _ in range(bins)]
    for s in sorted(chunk, key=lambda s: -len(s.token_ids)):
        open_bins = [b for b in range(bins) if len(shards[b]) < capacity]
        b = min(open_bins, key=lambda b: (loads[b], b))
        shards[b].append(s)
        loads[b] += len(s.token_ids)
    return shards


def token_budget_micro_batches(shards: list[list[TrainSample]], max_tokens: int) -> list[list[list[TrainSample]]]:
    """Each rank's samples cut into k micro-batches of at most ``max_tokens`` tokens, k the same on every rank.

    Under ZeRO every micro-batch is a collective (gradient reduction, parameter gathers), so a rank
    that needs fewer micro-batches than another gets empty ones. k starts at the least any rank
    needs (its over-budget sequences, plus ceil(other tokens / max_tokens)), and grows until a
    longest-first deal into k micro-batches keeps every micro-batch within the budget (a single
    sequence over the budget is let through alone), as verl's dynamic batch size does with its
    balanced partitions.
    """

    def least(shard: list[TrainSample]) -> int:
        over = [len(s.token_ids) for s in shard if len(s.token_ids) > max_tokens]
        rest = sum(len(s.token_ids) for s in shard) - sum(over)
        return len(over) + -(-rest // max_tokens)

    k = max([1] + [least(shard) for shard in shards])
    longest = max((len(s) for s in shards), default=0)
    while True:
        cut = [_deal(shard, k, len(shard)) for shard in shards]
        fits = all(
            len(mb) <= 1 or sum(len(s.token_ids) for s in mb) <= max_tokens for rank in cut for mb in rank
        )
        if fits or k >= longest:
            return cut
        k += 1


@dataclass
class Collated:
    """One micro-batch as tensors. The per-token fields are always in the padded layout [B, T-1], so the
    loss code is the same whichever way the model ran; only the model's inputs differ when packed."""

    input_ids: object  # torch.LongTensor [B, T]; packed: [1, N], N the samples' total length
    attention_mask: object  # [B, T]; packed: None (the position ids say where each sample starts)
    # Shifted by one: position t holds what predicts token t+1.
    targets: object
    target_mask: object  # bool [B, T-1]
    behaviour_logprobs: object  # float [B, T-1]
    has_behaviour: object  # bool [B, 1]
    advantages: object  # float [B, 1]
    # Packed only: positions restarting at 0 per sample [1, N], and for each (b, t) of the padded
    # layout the packed position whose hidden state predicts targets[b, t] [B, T-1].
    position_ids: object = None
    packed_index: object = None

    def model_inputs(self, device) -> dict:
        """Keyword arguments of PolicyLogprobs.forward, on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return {
            "input_ids": move(self.input_ids), "attention_mask": move(self.attention_mask),
            "targets": move(self.targets), "select": move(self.target_mask),
            "position_ids": move(self.position_ids), "packed_index": move(self.packed_index),
        }


def collate(samples: list[TrainSample], pad_id: int, packed: bool = False) -> Collated:
    """Tensors of a micro-batch: padded to its longest sample, or packed into one row (``packed``)."""
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
    batch = Collated(ids, attn, ids[:, 1:], mask[:, 1:], blp[:, 1:], has, adv)
    if not packed:
        return batch
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    batch.input_ids = ids[attn.bool()].unsqueeze(0)
    batch.attention_mask = None
    batch.position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
    # Beyond a sample's end the index is clamped inside the row; target_mask is False there anyway.
    index = starts.unsqueeze(1) + torch.arange(width - 1).unsqueeze(0)
    batch.packed_index = torch.minimum(index, (starts + lengths - 1).unsqueeze(1))
    return batch


def padding_fraction(micro_batches: list[list[TrainSample]], packed: bool) -> float:
    """Share of the token positions the model runs on that are padding."""
    useful = sum(len(s.token_ids) for mb in micro_batches for s in mb)
    run = sum(len(mb) * max(len(s.token_ids) for s in mb) for mb in micro_batches if mb) if not packed else useful
    return 1.0 - useful / run if run else 0.0
