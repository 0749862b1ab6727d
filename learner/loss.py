"""RAPO/GRPO policy-loss pieces (docs/rapo.md §4) as pure functions on tensors.

Shapes: per-token tensors are [B, T] (sequences × positions); ``mask`` is the loss mask
(1 on policy-generated tokens, 0 on prompt, tool responses and padding). Values at masked
positions may be anything, including inf/NaN: they never reach a result.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-mean"]

# exp() of a float32 log-ratio overflows past ~88; verl clamps at ±20 before exp and the k3
# value at 10, so one wild token cannot turn the whole step into inf/NaN.
LOG_RATIO_CLAMP = 20.0
KL_VALUE_CLAMP = 10.0


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _bool_mask(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1")
    return mask.bool()


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 where nothing is set (no NaN)."""
    _same_shape(x=x, mask=mask)
    m = _bool_mask(mask)
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1)
    return total.sum(dim) / m.sum(dim).clamp(min=1)


def importance_weights(prox_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Truncated IS weight min(π_prox / π_behaviour, cap) per token, detached.

    Decoupled PPO: the clip is taken against the proximal policy (log-probs the learner
    recomputes before the step) and this weight corrects for the staler behaviour policy that
    sampled the tokens. It is a constant of the step, so no gradient flows through it.
    """
    _same_shape(prox_logp=prox_logp, behaviour_logp=behaviour_logp)
    if not cap > 0:
        raise ValueError(f"importance-weight cap must be > 0, got {cap}")
    log_ratio = (prox_logp - behaviour_logp).detach()
    return torch.exp(log_ratio.clamp(max=LOG_RATIO_CLAMP)).clamp(max=cap)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref): exp(d) − d − 1 with d = ref_logp − logp; ≥ 0.

    Unbiased for the KL under samples from π and never negative, unlike the plain
    log-ratio (k1). expm1 keeps it accurate and non-negative when d is tiny; d and the value
    are clamped as verl does (see the module constants).
    """
    _same_shape(logp=logp, ref_logp=ref_logp)
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(d) - d).clamp(0.0, KL_VALUE_CLAMP)


class PPOTerms(NamedTuple):
    loss: Tensor  # [B, T] per-token loss, IS weight applied
    ratio: Tensor  # [B, T] π_θ / π_old
    clipped: Tensor  # [B, T] bool: the clipped surrogate was strictly the smaller one


def ppo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weight: Tensor | None = None,
) -> PPOTerms:
    """Per-token PPO clipped surrogate: −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) · w.

    ``advantages`` is [B, T], or one value per sequence as [B, 1] or [B] (broadcast over
    tokens). Where the clipped branch wins, the loss is a constant in θ: those tokens get no
    gradient, which is the point of the clip. ``clip_high > clip_low`` is DAPO's clip-higher.
    """
    _same_shape(logp=logp, old_logp=old_logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if not 0 <= clip_low < 1 or not clip_high >= 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    batch = logp.shape[0]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.dim() != 2 or advantages.shape[0] != batch or advantages.shape[1] not in (1, logp.shape[1]):
        raise ValueError(
            f"advantages must be [B, T], [B, 1] or [B] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()

    ratio = torch.exp((logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = ratio * advantages
    clipped_surr = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    clipped = clipped_surr < unclipped
    # where() rather than minimum(): the gradient comes from exactly one branch, also on ties.
    loss = -torch.where(clipped, clipped_surr, unclipped)
    if is_weight is not None:
        _same_shape(logp=logp, is_weight=is_weight)
        loss = loss * is_weight.detach()
    return PPOTerms(loss, ratio, clipped)


def aggregate(per_token: Tensor, mask: Tensor, mode: AggMode, normalizer: float) -> Tensor:
    """This micro-batch's share of the batch loss: a masked sum divided by a GLOBAL normalizer.

    ``token-mean``: Σ per_token·mask / normalizer, with normalizer = the loss tokens of the
    whole batch (all micro-batches on all data-parallel ranks).
    ``seq-mean-token-mean`` (paper Eq. 2): Σ over sequences of the sequence's masked token
    mean / normalizer, with normalizer = the sequences of the whole batch; a sequence with no
    loss tokens contributes 0 but still counts in the normalizer.

    Why global: a mean per micro-batch (or per rank) weights each micro-batch equally, so a
    token in a short micro-batch would count more than one in a long one, and the result
    would depend on how the batch happened to be split. Dividing every micro-batch's sum by
    the same global count makes the sum of the aggregated losses over all micro-batches and
    ranks exactly the mean over the whole batch, whatever the split. Note that DDP and
    DeepSpeed *average* gradients over the W ranks (and DeepSpeed divides by its gradient
    accumulation steps): the trainer must undo those divisions (multiply by W, as verl's
    ``× dp_size`` does) to keep this sum semantics.
    """
    _same_shape(per_token=per_token, mask=mask)
    if per_token.dim() != 2:
        raise ValueError(f"per_token must be [B, T], got shape {tuple(per_token.shape)}")
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (the global token or sequence count), got {normalizer}")
    if mode == "token-mean":
        m = _bool_mask(mask)
        return torch.where(m, per_token, torch.zeros_like(per_token)).sum() / normalizer
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=1).sum() / normalizer
    raise ValueError(f"unknown aggregation mode {mode!r}; allowed: 'token-mean', 'seq-mean-token-mean'")
