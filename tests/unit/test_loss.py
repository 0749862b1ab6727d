"""Policy-loss pieces (docs/rapo.md §4) against hand-worked numbers and the DP-split property."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.loss import aggregate, importance_weights, k3_kl, masked_mean, ppo_token_loss


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """float64 for this module's tensors only: set at import, the default leaked into every test
    collected after it (pytest imports all modules before running any)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float64)


# ---------------------------------------------------------------- importance weights


def test_importance_weights_truncate_and_detach() -> None:
    prox = t([math.log(0.5), math.log(0.3), math.log(0.9)]).requires_grad_()
    behaviour = t([math.log(0.5), math.log(0.6), math.log(0.1)])
    w = importance_weights(prox, behaviour, cap=2.0)
    # ratios 0.5/0.5 = 1, 0.3/0.6 = 0.5, 0.9/0.1 = 9 → capped at 2.
    torch.testing.assert_close(w, t([1.0, 0.5, 2.0]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        importance_weights(prox, behaviour, cap=0.0)


def test_importance_weights_survive_huge_log_ratio() -> None:
    w = importance_weights(torch.tensor([0.0], dtype=torch.float32), torch.tensor([-500.0], dtype=torch.float32), 5.0)
    assert w.item() == 5.0


# ---------------------------------------------------------------- k3 KL


def test_k3_is_zero_when_equal_and_positive_otherwise() -> None:
    logp = t([-1.0, -2.5, -0.1])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1, 3))
    # d = ref − logp = +1 → e − 1 − 1 = 0.718282; d = −1 → e⁻¹ + 1 − 1 = 0.367879.
    kl = k3_kl(t([-2.0, -1.0]), t([-1.0, -2.0]))
    torch.testing.assert_close(kl, t([math.e - 2.0, math.exp(-1.0)]))


@given(st.floats(-15, 0), st.floats(-15, 0))
def test_k3_non_negative_and_matches_formula(logp: float, ref: float) -> None:
    kl = k3_kl(torch.tensor([logp]), torch.tensor([ref])).item()
    d = ref - logp
    assert kl >= 0.0
    assert kl == pytest.approx(min(math.exp(d) - d - 1.0, 10.0), rel=1e-9, abs=1e-12)
    if logp != ref:
        assert kl > 0.0 or abs(d) < 1e-7  # below ~1e-7, d²/2 underflows relative to 1


def test_k3_tiny_difference_float32_stays_non_negative() -> None:
    logp = torch.tensor([-1.0, -1.0], dtype=torch.float32)
    ref = torch.tensor([-1.0 + 1e-7, -1.0 - 1e-7], dtype=torch.float32)
    assert (k3_kl(logp, ref) >= 0).all()


# ---------------------------------------------------------------- PPO surrogate


def test_ratio_one_gives_minus_advantage_and_no_clipping() -> None:
    logp = t([-1.0, -2.0, -0.5], [-0.3, -0.7, -4.0])
    adv = t([1.5], [-0.5])  # one advantage per sequence, broadcast over tokens
    terms = ppo_token_loss(logp, logp.clone(), adv)
    torch.testing.assert_close(terms.ratio, torch.ones(2, 3))
    torch.testing.assert_close(terms.loss, t([-1.5] * 3, [0.5] * 3))
    assert not terms.clipped.any()


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "clipped"),
    [
        # r = 1.5, A = +1: min(1.5, 1.2) = 1.2 → loss −1.2, clipped (no push further up).
        (1.5, 1.0, -1.2, True),
        # r = 1.5, A = −1: min(−1.5, −1.2) = −1.5 → loss 1.5, unclipped (pull back down).
        (1.5, -1.0, 1.5, False),
        # r = 0.5, A = +1: min(0.5, 0.8) = 0.5 → loss −0.5, unclipped (pull back up).
        (0.5, 1.0, -0.5, False),
        # r = 0.5, A = −1: min(−0.5, −0.8) = −0.8 → loss 0.8, clipped.
        (0.5, -1.0, 0.8, True),
        # Inside the range: r = 1.1, A = 2 → −2.2, unclipped.
        (1.1, 2.0, -2.2, False),
        # A = 0: both branches are 0; nothing counts as clipped.
        (3.0, 0.0, 0.0, False),
    ],
)
def test_ratio_outside_clip_range(ratio: float, adv: float, loss: float, clipped: bool) -> None:
    old = t([-1.0])
    logp = (old + math.log(ratio)).requires_grad_()
    terms = ppo_token_loss(logp, old, t([adv]))
    assert terms.loss.item() == pytest.approx(loss, abs=1e-12)
    assert terms.ratio.item() == pytest.approx(ratio, rel=1e-12)
    assert bool(terms.clipped.item()) is clipped
    terms.loss.sum().backward()
    # d(−r·A)/d logp = −r·A where unclipped; the clipped branch is constant in θ.
    assert logp.grad is not None
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-12)


def test_clip_higher_widens_only_the_upper_bound() -> None:
    old = t([-1.0, -1.0])
    logp = old + torch.log(t([1.25, 0.75]))
    # r = 1.25, A = 1: with ε_high = 0.28 the bound is 1.28 → unclipped, loss −1.25.
    # r = 0.75, A = −1: ε_low = 0.2 → clip at 0.8, min(−0.75, −0.8) = −0.8 → loss 0.8, clipped.
    terms = ppo_token_loss(logp, old, t([1.0, -1.0]), clip_low=0.2, clip_high=0.28)  # per token
    torch.testing.assert_close(terms.loss, t([-1.25, 0.8]))
    assert terms.clipped.tolist() == [[False, True]]


def test_is_weight_scales_loss_and_gets_no_gradient() -> None:
    old = t([-1.0, -1.0])
    logp = t([-1.0, -1.0])
    weight = t([0.5, 2.0]).requires_grad_()
    terms = ppo_token_loss(logp, old, t([1.0, -1.0]), is_weight=weight)
    # ratio 1: −A·w = [−0.5, 2.0]
    torch.testing.assert_close(terms.loss, t([-0.5, 2.0]))
    assert not terms.loss.requires_grad


def test_ppo_advantage_shapes() -> None:
    logp = torch.zeros(2, 3)
    per_seq = ppo_token_loss(logp, logp, torch.tensor([1.0, -2.0])).loss
    per_token = ppo_token_loss(logp, logp, torch.tensor([[1.0] * 3, [-2.0] * 3])).loss
    torch.testing.assert_close(per_seq, per_token)
    with pytest.raises(ValueError, match="advantages must be"):
        ppo_token_loss(logp, logp, torch.zeros(3))  # [T] is not [B]
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_token_loss(logp, torch.zeros(2, 4), torch.zeros(2, 1))


# ---------------------------------------------------------------- aggregation

PER_TOKEN = t([1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [6.0, 8.0, 0.0, 0.0])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])


def test_token_mean_hand_example() -> None:
    # Loss tokens 1+2+3 + 4 + 6+8 = 24 over 6 tokens = 4.0.
    assert aggregate(PER_TOKEN, MASK, "token-mean", normalizer=6).item() == pytest.approx(4.0)


def test_seq_mean_token_mean_hand_example() -> None:
    # Sequence means: (1+2+3)/3 = 2, 4/1 = 4, empty → 0, (6+8)/2 = 7; (2+4+0+7)/4 = 3.25.
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-mean", normalizer=4).item() == pytest.approx(3.25)


def test_token_mean_two_ranks_equals_whole_batch_token_mean() -> None:
    # Rank 0 gets sequences 0-1 (4 tokens), rank 1 gets 2-3 (2 tokens): unequal token counts.
    whole = PER_TOKEN[MASK.bool()].mean()
    global_tokens = int(MASK.sum())
    rank0 = aggregate(PER_TOKEN[:2], MASK[:2], "token-mean", global_tokens)
    rank1 = aggregate(PER_TOKEN[2:], MASK[2:], "token-mean", global_tokens)
    assert (rank0 + rank1).item() == pytest.approx(whole.item())
    # The mean of per-rank means would be (10/4 + 14/2)/2 = 4.75, not 4.0: why the normaliser is global.
    local = [aggregate(PER_TOKEN[s], MASK[s], "token-mean", int(MASK[s].sum())) for s in (slice(0, 2), slice(2, 4))]
    assert ((local[0] + local[1]) / 2).item() == pytest.approx(4.75)


def test_masked_positions_never_leak() -> None:
    dirty = PER_TOKEN.clone()
    dirty[~MASK.bool()] = float("nan")
    dirty[2, 0] = float("inf")
    assert aggregate(dirty, MASK, "token-mean", 6).item() == pytest.approx(4.0)
    assert aggregate(dirty, MASK, "seq-mean-token-mean", 4).item() == pytest.approx(3.25)


def test_masked_mean() -> None:
    assert masked_mean(PER_TOKEN, MASK).item() == pytest.approx(4.0)
    torch.testing.assert_close(masked_mean(PER_TOKEN, MASK, dim=1), torch.tensor([2.0, 4.0, 0.0, 7.0]))
    assert masked_mean(PER_TOKEN, torch.zeros_like(MASK)).item() == 0.0


def test_aggregate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(PER_TOKEN, MASK, "token-mean", 0)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(PER_TOKEN, MASK, "seq-mean-token-sum", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only 0 and 1"):
        aggregate(PER_TOKEN, MASK * 2, "token-mean", 6)


@st.composite
def split_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    b = draw(st.integers(1, 12))
    length = draw(st.integers(1, 10))
    values = draw(st.lists(st.floats(-100, 100), min_size=b * length, max_size=b * length))
    bits = draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))
    cuts = sorted(draw(st.sets(st.integers(1, b - 1), max_size=b - 1))) if b > 1 else []
    return t(*[values[i * length : (i + 1) * length] for i in range(b)]), torch.tensor(bits).view(b, length), cuts


@settings(deadline=None)
@given(split_batches())
def test_any_micro_batch_split_sums_to_the_whole_batch(case: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    per_token, mask, cuts = case
    bounds = [0, *cuts, per_token.shape[0]]
    parts = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    n_tokens = max(int(mask.sum()), 1)
    n_seqs = per_token.shape[0]
    for mode, norm in (("token-mean", n_tokens), ("seq-mean-token-mean", n_seqs)):
        whole = aggregate(per_token, mask, mode, norm)
        summed = sum(aggregate(per_token[p], mask[p], mode, norm) for p in parts)
        assert float(summed) == pytest.approx(float(whole), rel=1e-9, abs=1e-9)
    # And the whole-batch token-mean is the plain mean over loss tokens.
    if mask.any():
        expected = per_token[mask].mean()
        assert float(aggregate(per_token, mask, "token-mean", n_tokens)) == pytest.approx(float(expected), abs=1e-9)
