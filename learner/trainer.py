"""One learner rank: a DeepSpeed ZeRO engine that recomputes logprobs and applies the RAPO/GRPO loss.

W ranks form one torch.distributed group (gloo on CPU, NCCL on GPU). Each rank trains its
share of a step planned by the controller (learner.batch.plan_step); the loss of every
micro-batch is divided by the global token (or sequence) count so that the gradient is that
of the whole batch's mean.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from learner.batch import MiniBatch, RankPlan, TrainSample, collate
from learner.logprobs import PolicyLogprobs
from learner.loss import aggregate, importance_weights, k3_kl, masked_mean, ppo_token_loss
from learner.precision import Precision, detect_precision

if TYPE_CHECKING:
    from cluster.config import LearnerConfig


@dataclass
class DistSpec:
    rank: int
    world_size: int
    master_addr: str
    master_port: int


def ds_config(cfg: LearnerConfig, per_rank_micro_batches: int, gpu: bool) -> dict:
    """The DeepSpeed config of one rank; gradient accumulation covers one optimizer mini-batch."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": per_rank_micro_batches,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: the fused DeepSpeed op would JIT-compile for ~50 s on CPU.
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay, "torch_adam": not gpu},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def attention_implementation(choice: str, gpu: bool) -> str:
    """transformers' attention for the learner. auto: flash-attention 2 on a GPU where the package is
    installed (packed rows run as variable-length attention), else sdpa (packed rows get a
    block-diagonal causal mask, so CPU runs the same packed path)."""
    if choice != "auto":
        return choice
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def packing_for(setting: bool | str, attention: str) -> bool:
    """learner.packing: auto packs only where attention is variable-length (flash-attention). Under sdpa
    or eager a packed row gets a dense block-diagonal mask over the whole row, which on CPU measured
    slower than padding the demo's episodes (308 vs 419 useful tokens/s, bench/learner_throughput.py)."""
    if setting == "auto":
        return "flash" in attention
    return bool(setting)


def init_distributed(dist: DistSpec, gpu: bool) -> None:
    os.environ.update(
        MASTER_ADDR=dist.master_addr,
        MASTER_PORT=str(dist.master_port),
        RANK=str(dist.rank),
        WORLD_SIZE=str(dist.world_size),
        LOCAL_RANK="0" if gpu else str(dist.rank),
        LOCAL_SIZE=str(dist.world_size),
    )
    import deepspeed

    if not gpu:
        # The shm op only serves inference_all_reduce; building it costs a 20-30 s gcc compile.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")


class Trainer:
    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: Path,
        dist: DistSpec,
        *,
        per_rank_micro_batches: int,
        temperature: float = 1.0,
    ):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.dist = dist
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        # bf16 master weights (cfg.dtype) need no autocast; fp32 ones use it only where bf16 is native.
        self.precision = (
            detect_precision(cfg.autocast_bf16, self.device.type)
            if cfg.dtype == "float32"
            else Precision(False, "dtype=bfloat16: bf16 weights, no autocast")
        )
        if not self.gpu:
            # Ray pins OMP_NUM_THREADS to the actor's num_cpus (often 1); on CPU that halves the step.
            torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // dist.world_size))
        init_distributed(dist, self.gpu)
        torch.manual_seed(1234 + dist.rank)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # Pad positions are masked out of every loss term, so any valid id will do.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.attention = attention_implementation(cfg.attention, self.gpu)
        self.packed = packing_for(cfg.packing, self.attention)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=self.attention)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        policy = PolicyLogprobs(model, cfg.logprob_chunk_size, temperature)
        self.engine, *_ = deepspeed.initialize(
            model=policy,
            model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=ds_config(cfg, per_rank_micro_batches, self.gpu),
        )
        self.ref = self._load_reference(model_dir, temperature) if cfg.kl_coef > 0 else None
        # One loss position, so that its backward reaches every parameter (ZeRO's gradient hooks).
        self._idle = TrainSample([self.pad_id, self.pad_id], [0, 1], None, 0.0)

    def _load_reference(self, model_dir: Path, temperature: float):
        import deepspeed
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=self.attention
        )
        ref_model.config.use_cache = False
        ref = PolicyLogprobs(ref_model, self.cfg.logprob_chunk_size, temperature).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        if self.cfg.zero_stage == 3:
            # Partition the frozen copy too, or every rank would hold a full model for the KL term.
            engine, *_ = deepspeed.initialize(
                model=ref,
                config={
                    "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
                    "zero_optimization": {"stage": 3},
                    "bf16": {"enabled": self.cfg.dtype == "bfloat16"},
                },
            )
            return engine
        return ref.to(self.device)

    def _autocast(self):
        if self.precision.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward(self, module, batch):
        with self._autocast():
            return module(**batch.model_inputs(self.device))

    def _micro_batches(self, mb: MiniBatch) -> list[list[TrainSample]]:
        """This rank's micro-batches; an empty one (token-budget plans) becomes one idle two-token sample
        whose forward and backward (its loss times 0) only join the other ranks' collectives."""
        return [samples or [self._idle] for samples in mb.micro(self.cfg.micro_batch_size)]

    def _collate(self, samples: list[TrainSample]):
        return collate(samples, self.pad_id, packed=self.packed)

    def train_step(self, plan: RankPlan) -> dict[str, float]:
        """Train this rank's share of one step; returns sums that the controller adds up over ranks."""
        t0 = time.perf_counter()
        cfg = self.cfg
        self.engine.train()
        sums = {
            "loss": 0.0,
            "pg_loss": 0.0,
            "kl": 0.0,
            "entropy": 0.0,
            "clip_frac": 0.0,
            "ratio": 0.0,
            "is_weight": 0.0,
            "tokens": 0.0,
            "prox_behaviour_abs_diff": 0.0,
        }
        grad_norms = []
        # With one optimizer step per batch the proximal policy is the current one: its logprobs
        # are the detached forward values, no extra pass needed.
        old = self._proximal_logprobs(plan) if len(plan.mini_batches) > 1 else None
        for m, mb in enumerate(plan.mini_batches):
            micro = self._micro_batches(mb)
            for k, samples in enumerate(micro):
                # The plan, not DeepSpeed's fixed accumulation count, says where the mini-batch ends:
                # token-budget plans have a different number of micro-batches every step.
                self.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
                batch = self._collate(samples)
                mask = batch.target_mask.to(self.device)
                logp, entropy = self._forward(self.engine, batch)
                prox = old[(m, k)] if old is not None else logp.detach()
                # Samples without a behaviour policy count as on-policy: their weight is exactly 1.
                behaviour = torch.where(
                    batch.has_behaviour.to(self.device), batch.behaviour_logprobs.to(self.device), prox
                )
                is_w = importance_weights(prox, behaviour, cfg.behaviour_is_cap) if cfg.behaviour_is_cap else None
                terms = ppo_token_loss(logp, prox, batch.advantages.to(self.device), cfg.clip_low, cfg.clip_high, is_w)
                per_token = terms.loss
                kl = torch.zeros_like(logp)
                if self.ref is not None:
                    with torch.no_grad():
                        ref_logp, _ = self._forward(self.ref, batch)
                    kl = k3_kl(logp, ref_logp)
                    per_token = per_token + cfg.kl_coef * kl
                if cfg.entropy_coef:
                    per_token = per_token - cfg.entropy_coef * entropy
                normalizer = mb.global_tokens if cfg.loss_agg == "token-mean" else mb.global_seqs
                loss = aggregate(per_token, mask, cfg.loss_agg, max(normalizer, 1))
                idle = samples[0] is self._idle
                if idle:
                    loss = loss * 0.0
                # DeepSpeed averages gradients over ranks; multiplying by W keeps the global-sum semantics.
                self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)
                self.engine.step()
                if idle:
                    continue
                n = float(mask.sum())
                sums["loss"] += float(loss.detach())
                sums["pg_loss"] += float(masked_mean(terms.loss.detach(), mask)) * n
                sums["kl"] += float(masked_mean(kl.detach(), mask)) * n
                sums["entropy"] += float(masked_mean(entropy.detach(), mask)) * n
                sums["clip_frac"] += float(masked_mean(terms.clipped.float(), mask)) * n
                sums["ratio"] += float(masked_mean(terms.ratio.detach(), mask)) * n
                sums["is_weight"] += float(masked_mean(is_w, mask)) * n if is_w is not None else n
                sums["prox_behaviour_abs_diff"] += float(masked_mean((prox - behaviour).abs(), mask)) * n
                sums["tokens"] += n
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                grad_norms.append(float(norm))
        sums["grad_norm"] = max(grad_norms) if grad_norms else 0.0
        sums["train_time_s"] = time.perf_counter() - t0
        return sums

    @torch.no_grad()
    def _proximal_logprobs(self, plan: RankPlan) -> dict[tuple[int, int], torch.Tensor]:
        self.engine.eval()
        out = {}
        for m, mb in enumerate(plan.mini_batches):
            for k, samples in enumerate(self._micro_batches(mb)):
                out[(m, k)], _ = self._forward(self.engine, self._collate(samples))
        self.engine.train()
        return out

    @torch.no_grad()
    def logprobs(self, mini_batch: MiniBatch) -> list[list[float]]:
        """Current-policy logprob of every token after the first (0 where the loss mask is 0)."""
        self.engine.eval()
        out: list[list[float]] = []
        size = self.cfg.micro_batch_size
        for samples in (mini_batch.samples[i : i + size] for i in range(0, len(mini_batch.samples), size)):
            # No autocast: these are compared with the engine's logprobs at full precision.
            logp, _ = self.engine(**self._collate(samples).model_inputs(self.device))
            for row, s in zip(logp, samples):
                out.append(row[: len(s.token_ids) - 1].tolist())
        return out

    def export_weights(self, path: Path, dtype: str) -> int:
        """Write the full policy as safetensors (rank 0); a collective under ZeRO-3, so every rank calls it."""
        import deepspeed
        from safetensors.torch import save_file

        target = getattr(torch, dtype)
        model = self.engine.module.model
        tensors: dict[str, torch.Tensor] = {}
        zero3 = self.cfg.zero_stage == 3
        # Gather one parameter at a time so a large model never needs a second full copy per rank.
        for name, param in model.named_parameters():
            ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=None) if zero3 else nullcontext()
            with ctx:
                if self.dist.rank == 0:
                    tensors[name] = param.detach().to("cpu", target).clone()
        for name, buf in model.named_buffers():
            if self.dist.rank == 0 and "rotary" not in name:
                tensors.setdefault(name, buf.detach().to("cpu", target).clone())
        if self.dist.rank != 0:
            return 0
        if self.tied and "lm_head.weight" not in tensors:
            # vLLM keeps its own lm_head; without this key the reload leaves it stale.
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return len(tensors)

    def weight_plan(self, dtype: str, bucket_bytes: int):
        from learner.weight_stream import weight_plan

        return weight_plan(self.engine.module.model, dtype, bucket_bytes, self.tied)

    def send_weights(self, plan, transport) -> int:
        """Stream the policy to the rollout engines, bucket by bucket; a collective under ZeRO-3.
        `transport` (rollout/weight_transport.py) is rank 0's open group; None on the other ranks."""
        from learner.weight_stream import send_weights

        return send_weights(
            self.engine.module.model, plan, transport, zero3=self.cfg.zero_stage == 3, is_sender=self.dist.rank == 0
        )

    def save_checkpoint(self, directory: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(directory), tag=tag)

    def load_checkpoint(self, directory: Path, tag: str) -> None:
        self.engine.load_checkpoint(str(directory), tag=tag)

    def close(self) -> None:
        # Without this order ZeRO-3 can abort at interpreter exit (SIGABRT).
        try:
            self.engine.destroy()
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
