"""Per-token logprobs and entropy of the policy, computed in chunks.

Full-vocabulary logits for a whole batch (B x T x V floats) are the usual learner
out-of-memory. Here the LM head runs only on positions that carry loss, a chunk of
tokens at a time, and each chunk is checkpointed: backward recomputes its logits instead
of keeping them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def selected_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    select: torch.Tensor,
    chunk_size: int,
    temperature: float = 1.0,
    packed_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of ``targets`` and entropy at the ``select``ed positions, scattered back to [B, T].

    ``hidden`` is [B, T, d] aligned with ``targets``, or with ``packed_index`` one packed row
    [1, N, d] and ``packed_index`` [B, T] the row position that predicts each target.
    """
    rows = hidden[select] if packed_index is None else hidden[0, packed_index[select]]
    tgt = targets[select]
    lp_parts, ent_parts = [], []
    for i in range(0, rows.shape[0], chunk_size):
        h, t = rows[i : i + chunk_size], tgt[i : i + chunk_size]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, head, h, t, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, h, t, temperature)
        lp_parts.append(lp)
        ent_parts.append(ent)
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if lp_parts:
        logp = logp.index_put((select.nonzero(as_tuple=True)), torch.cat(lp_parts))
        entropy = entropy.index_put((select.nonzero(as_tuple=True)), torch.cat(ent_parts))
    return logp, entropy


class PolicyLogprobs(nn.Module):
    """Wraps a causal LM so that one forward call returns selected-token logprobs.

    DeepSpeed wraps this module: under ZeRO-3 its hooks gather parameters for every
    submodule call, the chunked LM-head calls included.
    """

    def __init__(self, model: nn.Module, chunk_size: int, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, targets, select, position_ids=None, packed_index=None):
        """Padded: ``attention_mask`` marks each row's tokens. Packed (``position_ids`` restarting at 0
        per sample, no attention mask): transformers keeps attention inside each sample, by a
        block-diagonal mask (sdpa, eager) or variable-length kernels (flash-attention)."""
        decoder = self.model.get_decoder()
        extra = varlen_kwargs(position_ids) if position_ids is not None and self._flash() else {}
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
        ).last_hidden_state
        if packed_index is None:
            hidden = hidden[:, :-1]
        head = self.model.get_output_embeddings()
        return selected_logprobs(head, hidden, targets, select, self.chunk_size, self.temperature, packed_index)

    def _flash(self) -> bool:
        return "flash" in str(getattr(self.model.config, "_attn_implementation", ""))


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """cu_seq_lens / max_length of a packed row, given once instead of re-derived by every layer."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
