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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of ``targets`` and entropy at the ``select``ed positions, scattered back to [B, T]."""
    rows = hidden[select]
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

    def forward(self, input_ids, attention_mask, targets, select):
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1]
        return selected_logprobs(self.model.get_output_embeddings(), hidden, targets, select, self.chunk_size, self.temperature)
