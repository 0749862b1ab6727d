"""The learner's side of a weight push: the policy as buckets, gathered, cast and sent one at a time.

Under ZeRO-3 each rank holds a shard of every parameter; gathering one bucket at a time (a
collective every rank joins) and freeing it after the send means no process ever holds the whole
state dict. Rank 0 hands each gathered bucket to the weight transport (rollout/weight_transport.py),
which casts it into the rollout dtype, packs it into one flat buffer and broadcasts that buffer to
every rollout engine at once: gloo (rollout/weight_wire.py) or vLLM's NCCL producer.

The names are the checkpoint's (HF) names; vLLM's loader maps them onto its stacked parameters
(qkv, gate_up) as it does for a checkpoint. A tied model also sends `lm_head.weight` (the
embedding again): vLLM keeps its own head, and without the key a reload leaves it stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch

from rollout.weight_wire import UpdatePlan, plan_buckets

TIED_HEAD = "lm_head.weight"
TIED_FROM = "model.embed_tokens.weight"


def _shape(param: torch.Tensor) -> list[int]:
    # A ZeRO-3 partitioned parameter is empty locally; its full shape is ds_shape.
    return list(getattr(param, "ds_shape", None) or param.shape)


def named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a push sends, in a fixed order: parameters, then persistent buffers (no rotary caches)."""
    out = list(model.named_parameters())
    names = {n for n, _ in out}
    out += [(n, b) for n, b in model.named_buffers() if "rotary" not in n and n not in names]
    return out


def weight_plan(model: torch.nn.Module, dtype: str, bucket_bytes: int, tied: bool) -> UpdatePlan:
    params = [(name, dtype, _shape(t)) for name, t in named_tensors(model)]
    if tied and all(name != TIED_HEAD for name, _, _ in params):
        embed = next(shape for name, _, shape in params if name == TIED_FROM)
        params.append((TIED_HEAD, dtype, embed))
    return plan_buckets(params, bucket_bytes)


def gathered_buckets(model: torch.nn.Module, plan: UpdatePlan, zero3: bool) -> Iterator[list[torch.Tensor]]:
    """Each bucket's full tensors, gathered for the duration of one iteration step (every rank iterates)."""
    tensors = dict(named_tensors(model))
    for bucket in plan.buckets():
        names = [TIED_FROM if name == TIED_HEAD and name not in tensors else name for name, _, _ in bucket]
        params = [tensors[n] for n in names]
        partitioned = [p for p in params if hasattr(p, "ds_id")]
        with _gathered(partitioned) if zero3 and partitioned else nullcontext():
            yield params


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def send_weights(model: torch.nn.Module, plan: UpdatePlan, transport, *, zero3: bool, is_sender: bool) -> int:
    """Stream one version: gather, cast+pack, broadcast, free, bucket by bucket. Returns bytes sent.

    `transport` is rank 0's open weight group (rollout/weight_transport.py); unused on other ranks."""
    sent = 0
    send = transport.sender(plan) if is_sender else None
    for bucket, tensors in zip(plan.buckets(), gathered_buckets(model, plan, zero3)):
        if is_sender:
            send(bucket, tensors)
            sent += sum(t.numel() * dtype.itemsize for t, (_, dtype, _) in zip(tensors, bucket))
    return sent
