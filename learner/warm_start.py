"""Supervised warm start: a few steps on successful episodes, so RL starts with a usable policy.

The raw SmolLM2 checkpoint never calls the tools (reward ~0, no signal for RL); a handful of
steps on gold episodes teaches it the format and copying names out of tool responses. The
step count is kept small on purpose: RL needs room left to improve.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.batch import TrainSample, collate
from learner.logprobs import PolicyLogprobs
from learner.loss import masked_mean


@dataclass
class WarmStartResult:
    steps: int
    losses: list[float]
    seconds: float


def supervised_warm_start(
    model,
    episodes: list[TrainSample],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    chunk_size: int = 512,
    bf16: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> WarmStartResult:
    """Train ``model`` in place: token-mean cross-entropy on the loss-masked (assistant) tokens.

    ``bf16`` autocasts the CPU forward/backward (learner.precision decides where that is native).
    """
    if not episodes:
        raise ValueError("no demonstration episodes to warm-start on")
    t0 = time.perf_counter()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    policy = PolicyLogprobs(model, chunk_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(episodes)))
            rng.shuffle(fresh)
            order += fresh
        batch = collate([episodes[i] for i in order[:batch_size]], pad_id)
        order = order[batch_size:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logp, _ = policy(batch.input_ids, batch.attention_mask, batch.targets, batch.target_mask)
        loss = -masked_mean(logp, batch.target_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step + 1, losses[-1])
    model.gradient_checkpointing_disable()
    model.eval()
    return WarmStartResult(steps, losses, time.perf_counter() - t0)

