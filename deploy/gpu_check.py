#!/usr/bin/env python3
"""GPU check of the learner: DeepSpeed ZeRO training steps through rapo-cluster's own Trainer.

Builds a RANDOM-INIT model with Qwen3-0.6B's (or --shape qwen3-4b: Qwen3-4B's) architecture (no
hub, no internet: the config is written below, the weights are random, the tokenizer is a minimal
local one), saves it to a temp folder because learner.trainer.Trainer loads from a folder, then
runs a few RAPO training steps (bf16, NCCL, ZeRO stage 3 by default) on batches of random token
ids with a realistic loss mask (prompt and tool responses masked out, assistant turns trained),
packed micro-batches by default (learner.packing; --no-packing pads each row), and prints:

  tokens/s, step time, peak GPU memory, and model FLOPs utilisation (MFU).

MFU counts the FLOPs the step needs, forward + backward, over all ranks, divided by the time and
the GPUs' peak dense bf16 FLOP/s:

  step FLOPs = 6 * N * T                     decoder weights (N = non-embedding parameters,
                                             T = the samples' tokens; padding is not model work)
             + 12 * L * H * Q * sum_i S_i^2  attention scores and values, PaLM's convention
                                             (L layers, H query heads, Q head dim, S_i the length
                                             of sequence i; causal masking is not discounted)
             + 6 * V * d * T_loss            LM head (V vocab, d hidden), which the learner runs
                                             only on loss-mask positions (learner/logprobs.py)
  MFU = step FLOPs / (step time * world size * peak FLOP/s)

Recomputation (activation checkpointing, the checkpointed LM-head chunks) is not counted: this is
model FLOPs utilisation, not hardware FLOPs utilisation. `mfu_lm_head_all_tokens` also reports
the usual 6*(N + V*d)*T convention (LM head on every token), for comparison with other trainers.

Peak dense bf16 FLOP/s come from the device name (H100 SXM 989e12, H100 PCIe 756e12, H200
989e12, A100 312e12, ...); --peak-tflops overrides it.

Usage (deploy/gpu_check.sh wraps this and prints versions first):
  python deploy/gpu_check.py                         # one GPU, Qwen3-0.6B shape, 8 x 2048 tokens
  torchrun --standalone --nproc_per_node 4 deploy/gpu_check.py   # several GPUs (one per rank)
  python deploy/gpu_check.py --cpu                   # plumbing check on CPU: tiny model, gloo
  python deploy/gpu_check.py --matrix                # 0.6B and 4B x ZeRO-2/3 x checkpointing on/off:
                                                     # one process per case, then a Markdown MFU table
  python deploy/gpu_check.py --cpu --matrix          # the same cases on the tiny model (a dry run)

--lengths longtail draws long-tailed sequence lengths (up to --seq-len), where packing and
--max-tokens (token-budget micro-batches) matter; the attention kernel in use is printed
(learner.attention auto: flash_attention_2 where the flash-attn package is installed, else sdpa,
which packs with a block-diagonal mask).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a checkout without installing the project

# Qwen3-0.6B (Qwen/Qwen3-0.6B config.json), written out so that nothing is downloaded.
QWEN3_0_6B = dict(
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
    max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
)
# Qwen3-4B (Qwen/Qwen3-4B config.json).
QWEN3_4B = dict(
    hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
    max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
)
# --cpu: the same family, small enough for a plumbing check in seconds.
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, rope_theta=1_000_000.0,
    max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets; first match wins.
PEAK_BF16_DENSE = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (the device name reads e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
]

SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-4b": QWEN3_4B, "tiny": TINY}

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def peak_flops_for(device_name: str) -> float | None:
    name = device_name.upper()
    for key, flops in PEAK_BF16_DENSE:
        if key in name:
            return flops
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="plumbing check on CPU (tiny model, gloo, fp32 + bf16 autocast)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank per step (default 8; --cpu 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; --cpu 256)")
    p.add_argument("--micro-batch", type=int, default=None, help="learner.micro_batch_size (default 4; --cpu 2)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=3)
    p.add_argument("--shape", choices=["qwen3-0.6b", "qwen3-4b"], default="qwen3-0.6b",
                   help="model architecture (random init); --cpu always uses a tiny one")
    p.add_argument("--no-packing", action="store_true", help="learner.packing=false: pad each sequence to its row")
    p.add_argument("--attention", choices=["auto", "sdpa", "eager", "flash_attention_2"], default="auto",
                   help="learner.attention")
    p.add_argument("--lengths", choices=["fixed", "longtail"], default="fixed",
                   help="fixed: every sequence --seq-len tokens; longtail: long-tailed lengths up to --seq-len")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="learner.max_tokens_per_micro_batch: token-budget micro-batches instead of --micro-batch")
    p.add_argument("--matrix", action="store_true",
                   help="run every --shapes x ZeRO-2/3 x activation checkpointing on/off case in its own process "
                        "and print a Markdown table of MFU (other options apply to every case)")
    p.add_argument("--shapes", default="qwen3-0.6b,qwen3-4b", help="--matrix: comma-separated shapes")
    p.add_argument("--nproc", type=int, default=1, help="--matrix: GPUs per case (torchrun)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --cpu 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --cpu 1)")
    p.add_argument("--chunk", type=int, default=1024, help="learner.logprob_chunk_size")
    p.add_argument("--no-grad-ckpt", action="store_true", help="learner.gradient_checkpointing=false")
    p.add_argument("--kl", action="store_true", help="learner.kl_coef=0.001: also load and run the reference model")
    p.add_argument("--torch-adam", action="store_true",
                   help="torch's AdamW instead of DeepSpeed's FusedAdam on GPU (if FusedAdam cannot be built here)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s of one GPU (overrides the table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where to write the random model, kept for later checks (default: a temp folder, removed)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile one extra (untimed) step with torch.profiler; write the op table here, print its top",
    )
    args = p.parse_args(argv)
    small = args.cpu
    args.batch = args.batch or (4 if small else 8)
    args.seq_len = args.seq_len or (256 if small else 2048)
    args.micro_batch = args.micro_batch or (2 if small else 4)
    args.steps = args.steps if args.steps is not None else (2 if small else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 2)
    if args.batch % args.micro_batch:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if set(args.shapes) - {"qwen3-0.6b", "qwen3-4b"}:
        unknown = sorted(set(args.shapes) - {"qwen3-0.6b", "qwen3-4b"})
        p.error(f"--shapes: unknown {unknown}; allowed: qwen3-0.6b, qwen3-4b")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Distributed set-up: world size 1, or torchrun's environment


def dist_env() -> tuple[int, int, int, str, int]:
    """(rank, world_size, local_rank, master_addr, master_port) from torchrun, else a single rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", 29500)),
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return 0, 1, 0, "127.0.0.1", port


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# The random model folder


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A minimal word-level tokenizer: Trainer only needs its pad id (token ids are random)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    vocab.update({f"t{i}": i for i in range(3, min(vocab_size, 256))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.save_pretrained(out)


def build_model_dir(out: Path, arch: dict, seed: int) -> dict:
    """Random-init Qwen3 (LlamaConfig with the same sizes where Qwen3 is missing), saved as bf16."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        from transformers import Qwen3Config as Config
        from transformers import Qwen3ForCausalLM as Model

        cfg_kwargs = dict(arch)
        family = "qwen3"
    except ImportError:  # transformers < 4.51
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model

        cfg_kwargs = dict(arch)
        family = "llama (Qwen3 not in this transformers)"
    config = Config(**cfg_kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = Model(config)
    total = sum(p.numel() for p in model.parameters())  # tied LM head counted once
    embed = model.get_input_embeddings().weight.numel()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, arch["vocab_size"])
    meta = {
        "arch": arch,
        "family": family,
        "transformers": transformers.__version__,
        "params_total": total,
        "params_embedding": embed,
        "params_non_embedding": total - embed,
    }
    (out / "gpu_check_model.json").write_text(json.dumps(meta))
    return meta


def wait_for(path: Path, timeout_s: float = 900) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank 0 did not write {path} within {timeout_s:.0f} s")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Batches shaped like agent episodes


def episode_mask(seq_len: int, rng) -> list[int]:
    """Prompt (masked), then assistant turns (trained) alternating with tool responses (masked)."""
    scale = seq_len / 2048
    mask = [0] * max(1, int(rng.integers(int(150 * scale) + 1, int(400 * scale) + 2)))
    turn = 1
    while len(mask) < seq_len:
        if turn:
            n = int(rng.integers(int(80 * scale) + 1, int(500 * scale) + 2))
        else:
            n = int(rng.integers(int(150 * scale) + 1, int(900 * scale) + 2))
        mask.extend([turn] * n)
        turn ^= 1
    mask = mask[:seq_len]
    mask[-1] = 1  # episodes end on an assistant turn (the answer)
    return mask


def sample_length(seq_len: int, lengths: str, rng) -> int:
    """fixed: seq_len. longtail: most episodes short, a few at the cap, as multi-turn agent episodes are."""
    if lengths == "fixed":
        return seq_len
    return int(min(seq_len, max(16, seq_len / 6 * math.exp(rng.normal(0, 0.9)))))


def make_samples(n: int, seq_len: int, vocab: int, seed: int, lengths: str = "fixed"):
    import numpy as np

    from learner.batch import TrainSample

    rng = np.random.default_rng(seed)
    uniform = -math.log(vocab)  # a random-init policy is close to uniform
    samples = []
    for i in range(n):
        length = sample_length(seq_len, lengths, rng)
        ids = rng.integers(3, vocab, size=length).tolist()
        mask = episode_mask(seq_len, rng)[:length]
        mask[-1] = 1
        behaviour = (uniform + rng.normal(0, 0.05, size=length)).tolist()
        samples.append(
            TrainSample(
                token_ids=ids,
                loss_mask=mask,
                behaviour_logprobs=behaviour,
                advantage=float(rng.normal()),
                question_id=f"q{i // 4}",
            )
        )
    return samples


def step_flops(samples, arch: dict, n_non_embedding: int) -> dict[str, float]:
    d, L, H, Q, V = (
        arch["hidden_size"],
        arch["num_hidden_layers"],
        arch["num_attention_heads"],
        arch["head_dim"],
        arch["vocab_size"],
    )
    tokens = sum(len(s.token_ids) for s in samples)
    loss_tokens = sum(s.loss_tokens for s in samples)
    attention = 12 * L * H * Q * sum(len(s.token_ids) ** 2 for s in samples)
    model = 6 * n_non_embedding * tokens + attention + 6 * V * d * loss_tokens
    all_head = 6 * (n_non_embedding + V * d) * tokens + attention
    return {
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "flops": float(model),
        "flops_lm_head_all_tokens": float(all_head),
    }


# ---------------------------------------------------------------------------------------------


def case_argv(args: argparse.Namespace) -> list[str]:
    """The options every --matrix case shares, as gpu_check.py arguments."""
    out = [
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--micro-batch",
        str(args.micro_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--chunk",
        str(args.chunk),
        "--seed",
        str(args.seed),
        "--attention",
        args.attention,
        "--lengths",
        args.lengths,
    ]
    flags = {"--cpu": args.cpu, "--kl": args.kl, "--torch-adam": args.torch_adam, "--no-packing": args.no_packing}
    out += [flag for flag, on in flags.items() if on]
    if args.max_tokens:
        out += ["--max-tokens", str(args.max_tokens)]
    if args.peak_tflops:
        out += ["--peak-tflops", str(args.peak_tflops)]
    return out


def mfu_table(results: list[dict]) -> str:
    """Markdown, ready for the README."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    lines = [
        "| shape | ZeRO | act. ckpt | layout | attention | tokens/s per GPU | step s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['shape']} | {r['zero_stage']} | {'on' if r['gradient_checkpointing'] else 'off'} "
                f"| | | {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['shape']} | {r['zero_stage']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {'packed' if r['packing'] else 'padded'} | {r['attention']} | {r['tokens_per_s_per_gpu']:,.0f} "
            f"| {r['step_s_median']:.3f} | {pct(r['mfu'])} | {r['peak_mem_allocated_gib']:.1f} |"
        )
    return "\n".join(lines)


def run_matrix(args: argparse.Namespace) -> int:
    """Every case in its own process (DeepSpeed and the process group are set up once per process)."""
    import subprocess

    shapes = ["tiny"] if args.cpu else args.shapes
    results, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="rapo-gpu-check-matrix-") as tmp:
        for shape in shapes:
            for stage in (2, 3):
                for ckpt in (True, False):
                    out = Path(tmp) / f"{shape}-z{stage}-{int(ckpt)}.json"
                    cmd = [
                        *case_argv(args),
                        "--zero-stage",
                        str(stage),
                        "--json",
                        str(out),
                        "--model-dir",
                        str(Path(tmp) / f"model-{shape}"),
                    ]
                    cmd += [] if args.cpu else ["--shape", shape]
                    cmd += [] if ckpt else ["--no-grad-ckpt"]
                    if args.nproc > 1:
                        cmd = [
                            sys.executable,
                            "-m",
                            "torch.distributed.run",
                            "--standalone",
                            "--nproc_per_node",
                            str(args.nproc),
                            __file__,
                            *cmd,
                        ]
                    else:
                        cmd = [sys.executable, __file__, *cmd]
                    print(f"== {shape}, ZeRO-{stage}, activation checkpointing {'on' if ckpt else 'off'}", flush=True)
                    proc = subprocess.run(cmd)
                    if proc.returncode == 0 and out.exists():
                        results.append(json.loads(out.read_text()))
                    else:
                        failed += 1
                        results.append(
                            {
                                "shape": shape,
                                "zero_stage": stage,
                                "gradient_checkpointing": ckpt,
                                "error": f"failed (exit {proc.returncode}; out of memory?)",
                            }
                        )
    table = mfu_table(results)
    print()
    print(table)
    print("GPU_CHECK_MATRIX " + json.dumps(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cases": results, "table": table}, indent=2))
    return 1 if failed == len(results) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.matrix:
        return run_matrix(args)
    rank, world, local_rank, master_addr, master_port = dist_env()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif world > 1:
        # Trainer uses cuda:0 of what it sees (Ray gives each learner actor one GPU): do the same.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from cluster.config import LearnerConfig
    from learner import trainer as trainer_mod
    from learner.batch import padding_fraction, plan_step
    from learner.trainer import DistSpec, Trainer

    gpu = torch.cuda.is_available()
    if not args.cpu and not gpu:
        print("error: no CUDA device visible (use --cpu for a plumbing check)", file=sys.stderr)
        return 2
    arch = TINY if args.cpu else SHAPES[args.shape]
    if args.seq_len > arch["max_position_embeddings"]:
        print(
            f"error: --seq-len {args.seq_len} exceeds the model's {arch['max_position_embeddings']} positions",
            file=sys.stderr,
        )
        return 2

    tmp = None
    if args.model_dir is not None:
        model_dir = args.model_dir
    elif world > 1:
        # torchrun's ranks must agree on the folder: derive it from the master port they share.
        model_dir = Path(tempfile.gettempdir()) / f"rapo-gpu-check-{master_port}"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="rapo-gpu-check-")
        model_dir = Path(tmp.name) / "model"
    marker = model_dir / "gpu_check_model.json"
    t0 = time.perf_counter()
    meta, reused = None, False
    if rank == 0 and args.model_dir is not None and marker.exists():
        found = json.loads(marker.read_text())
        # A previous check wrote a model there: reuse it if it has this shape.
        if found.get("arch") == json.loads(json.dumps(arch)):
            meta, reused = found, True
    if rank == 0 and meta is None:
        meta = build_model_dir(model_dir, arch, args.seed)
    elif rank != 0:
        wait_for(marker)
        meta = json.loads(marker.read_text())
    build_s = time.perf_counter() - t0
    log(
        rank,
        f"model: random-init {meta['family']} ({meta['params_total'] / 1e6:.1f} M parameters, "
        f"{meta['params_non_embedding'] / 1e6:.1f} M non-embedding) "
        + (f"reused from {model_dir}" if reused else f"written to {model_dir} in {build_s:.1f} s"),
    )

    if args.torch_adam:
        original = trainer_mod.ds_config

        def torch_adam_config(cfg, per_rank_micro_batches, gpu_):
            conf = original(cfg, per_rank_micro_batches, gpu_)
            conf["optimizer"]["params"]["torch_adam"] = True
            return conf

        trainer_mod.ds_config = torch_adam_config

    lc = LearnerConfig(
        num_ranks=world,
        zero_stage=args.zero_stage,
        dtype="float32" if args.cpu else "bfloat16",
        micro_batch_size=args.micro_batch,
        mini_batches=1,
        lr=1e-6,
        betas=(0.9, 0.95),
        kl_coef=0.001 if args.kl else 0.0,
        gradient_checkpointing=not args.no_grad_ckpt,
        logprob_chunk_size=args.chunk,
        packing=not args.no_packing,
        attention=args.attention,
        max_tokens_per_micro_batch=args.max_tokens,
    )
    dist = DistSpec(rank=rank, world_size=world, master_addr=master_addr, master_port=master_port)
    t0 = time.perf_counter()
    trainer = Trainer(lc, model_dir, dist, per_rank_micro_batches=args.batch // args.micro_batch)
    setup_s = time.perf_counter() - t0
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    device_name = torch.cuda.get_device_name(0) if trainer.gpu else "cpu"
    layout = "padded" if args.no_packing else "packed"
    log(
        rank,
        f"trainer: {backend} x {world}, ZeRO-{lc.zero_stage}, {lc.dtype}, device {device_name}, "
        f"{layout} micro-batches, attention {trainer.attention}, ready in {setup_s:.1f} s",
    )

    # Every rank draws the whole global batch from one seed and plans the same step: exact global counts.
    everything = make_samples(args.batch * world, args.seq_len, arch["vocab_size"], args.seed, args.lengths)
    plan = plan_step(everything, world, 1, seed=args.seed, max_tokens=args.max_tokens)[rank]
    micro = plan.mini_batches[0].micro(args.micro_batch)
    pad_fraction = padding_fraction(micro, packed=not args.no_packing)
    flops = step_flops(everything, arch, meta["params_non_embedding"])

    def sync():
        if trainer.gpu:
            torch.cuda.synchronize()

    ok = True
    times, losses = [], []
    try:
        # With --profile, one more (untimed) step runs under the profiler after the timed ones.
        total = args.warmup + args.steps + (1 if args.profile else 0)
        for i in range(total):
            if i == args.warmup and trainer.gpu:
                torch.cuda.reset_peak_memory_stats()
            profiler = None
            if args.profile and i == args.warmup + args.steps:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.gpu else [])
                profiler = profile(activities=activities)
                profiler.__enter__()
            sync()
            t = time.perf_counter()
            out = trainer.train_step(plan)
            sync()
            dt = time.perf_counter() - t
            if profiler is not None:
                profiler.__exit__(None, None, None)
                key = "self_cuda_time_total" if trainer.gpu else "self_cpu_time_total"
                table = profiler.key_averages().table(sort_by=key, row_limit=40)
                if rank == 0:
                    args.profile.write_text(table)
                    print("\n".join(table.splitlines()[:25]))
            loss = out["loss"]
            if not math.isfinite(loss) or not math.isfinite(out["grad_norm"]):
                print(f"rank {rank}: step {i}: non-finite loss {loss} / grad norm {out['grad_norm']}", file=sys.stderr)
                ok = False
                break
            timed = args.warmup <= i < args.warmup + args.steps
            if timed:
                times.append(dt)
                losses.append(loss)
            tag = " (warm-up)" if i < args.warmup else (" (profiled, not timed)" if not timed else "")
            log(rank, f"step {i + 1}/{total}{tag}: {dt:.3f} s, loss {loss:+.5f}, grad norm {out['grad_norm']:.4f}")
        peak_alloc = torch.cuda.max_memory_allocated() if trainer.gpu else 0
        peak_reserved = torch.cuda.max_memory_reserved() if trainer.gpu else 0
        total_mem = torch.cuda.get_device_properties(0).total_memory if trainer.gpu else 0
    finally:
        trainer.close()
        if tmp is not None:
            tmp.cleanup()
        if world > 1 and rank == 0 and args.model_dir is None:
            import shutil

            shutil.rmtree(model_dir, ignore_errors=True)
    if not ok or not times:
        return 1

    step_s = sorted(times)[len(times) // 2]  # median
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (peak_flops_for(device_name) if trainer.gpu else None)
    mfu = flops["flops"] / (step_s * world * peak) if peak else None
    mfu_all = flops["flops_lm_head_all_tokens"] / (step_s * world * peak) if peak else None
    result = {
        "device": device_name,
        "world_size": world,
        "backend": backend,
        "zero_stage": lc.zero_stage,
        "dtype": lc.dtype,
        "model": meta["family"],
        "params_total": meta["params_total"],
        "params_non_embedding": meta["params_non_embedding"],
        "batch_per_rank": args.batch,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "gradient_checkpointing": lc.gradient_checkpointing,
        "kl": bool(args.kl),
        "shape": "tiny" if args.cpu else args.shape,
        "packing": lc.packing,
        "attention": trainer.attention,
        "lengths": args.lengths,
        "max_tokens": args.max_tokens,
        "micro_batches_per_rank": len(micro),
        "pad_fraction": pad_fraction,
        "optimizer": "torch AdamW" if (args.torch_adam or not trainer.gpu) else "DeepSpeed FusedAdam",
        "tokens_per_step": flops["tokens"],
        "loss_tokens_per_step": flops["loss_tokens"],
        "step_s_median": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_s": flops["tokens"] / step_s,
        "tokens_per_s_per_gpu": flops["tokens"] / step_s / world,
        "model_tflops_per_step": flops["flops"] / 1e12,
        "achieved_tflops_per_gpu": flops["flops"] / step_s / world / 1e12,
        "peak_tflops_per_gpu": peak / 1e12 if peak else None,
        "mfu": mfu,
        "mfu_lm_head_all_tokens": mfu_all,
        "peak_mem_allocated_gib": peak_alloc / 2**30,
        "peak_mem_reserved_gib": peak_reserved / 2**30,
        "gpu_mem_total_gib": total_mem / 2**30,
        "final_loss": losses[-1],
        "setup_s": setup_s,
    }
    if rank == 0:
        why = (
            "n/a (unknown GPU: pass --peak-tflops)" if trainer.gpu else "n/a on CPU (pass --peak-tflops to compute it)"
        )
        pct = lambda x: why if x is None else f"{100 * x:.1f} %"  # noqa: E731
        print()
        print(
            f"  device              {device_name} x {world} "
            f"({backend}, ZeRO-{lc.zero_stage}, {lc.dtype}, {result['optimizer']})"
        )
        cut = f"{args.max_tokens}-token micro-batches" if args.max_tokens else f"micro-batch {args.micro_batch}"
        print(
            f"  batch               {world} x {args.batch} sequences ({args.lengths} lengths <= {args.seq_len}) = "
            f"{flops['tokens']} tokens/step ({flops['loss_tokens']} in the loss mask), {cut}"
        )
        print(
            f"  layout              {layout}, attention {trainer.attention}, {len(micro)} micro-batches on rank 0, "
            f"padding {100 * pad_fraction:.1f} % of the positions run"
        )
        print(
            f"  step time           {step_s:.3f} s median over {len(times)} "
            f"(min {min(times):.3f}, max {max(times):.3f})"
        )
        print(f"  tokens/s            {result['tokens_per_s']:,.0f} ({result['tokens_per_s_per_gpu']:,.0f} per GPU)")
        if trainer.gpu:
            print(
                f"  peak GPU memory     {result['peak_mem_allocated_gib']:.2f} GiB allocated, "
                f"{result['peak_mem_reserved_gib']:.2f} GiB reserved, of {result['gpu_mem_total_gib']:.1f} GiB"
            )
        print(
            f"  model FLOPs/step    {result['model_tflops_per_step']:.1f} TFLOP -> "
            f"{result['achieved_tflops_per_gpu']:.1f} TFLOP/s per GPU"
            + (f" of {peak / 1e12:.0f} peak" if peak else "")
        )
        print(
            f"  MFU                 {pct(mfu)}"
            + (f"   (LM head on every token, 6N convention: {pct(mfu_all)})" if mfu else "")
        )
        print(
            "  formula             MFU = [6*N_nonemb*T + 12*L*H*Q*sum(S_i^2) + 6*V*d*T_loss] / (step_s * world * peak)"
        )
        print("GPU_CHECK_RESULT " + json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
