"""Learner throughput: padded vs packed micro-batches, fixed-size vs token-budget micro-batches, side by side.

One run builds a random-init model of a real shape (default: SmolLM2-135M, the demo's policy),
starts the real learner (learner.trainer.Trainer: DeepSpeed ZeRO-2, one gloo rank) and trains
the same batches under four settings, interleaved round-robin so that the machine's load drifts
over all of them alike:

  padded+fixed    one row per sequence, learner.micro_batch_size sequences per micro-batch (the old path)
  packed+fixed    the same micro-batches, each packed into one row
  padded+budget   micro-batches cut by learner.max_tokens_per_micro_batch, padded
  packed+budget   the same, packed (the new path at its best)

on two batch mixes:

  demo       gold demo-world episodes (rollout.demonstrations, real tokenizer): the prompt, 2 or 4
             tool calls with their responses and the answer, 540-1020 tokens, as the demo trains on
  longtail   synthetic long-tailed agent episodes: geometric tool-call counts (many short episodes, a
             few with 6-10 calls), up to --max-len tokens

For each it prints the median step time, useful (non-padding) tokens per second and the padding
fraction of the positions the model ran on. The last line is for the long-tailed mix:

  packed_speedup=X pad_fraction_before=Y pad_fraction_after=Z

X = useful tokens/s of packed+budget over padded+fixed; Y and Z their padding fractions.
The model runs in bf16 autocast where the CPU has native bf16, else fp32 (chosen here, printed).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# SmolLM2-135M-Instruct's architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json).
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)

SETTINGS = [("padded+fixed", False, False), ("packed+fixed", True, False),
            ("padded+budget", False, True), ("packed+budget", True, True)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers of the SmolLM2 shape (30 = the real one)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (the demo: 4 questions x 4 samples)")
    p.add_argument("--micro-batch", type=int, default=2,
                   help="learner.micro_batch_size of the fixed settings (demo: 2)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="learner.max_tokens_per_micro_batch of the budget settings (default: 2 x 2048, the most "
                        "a padded demo micro-batch can hold)")
    p.add_argument("--max-len", type=int, default=2048, help="longest synthetic episode (the demo's max_model_len)")
    p.add_argument("--reps", type=int, default=2, help="timed steps per setting and mix")
    p.add_argument("--mixes", default="demo,longtail", help="comma-separated: demo, longtail")
    p.add_argument("--dtype", choices=["auto", "float32", "bf16-autocast"], default="auto",
                   help="auto: bf16 autocast where the CPU has native bf16, else fp32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = set(args.mixes) - {"demo", "longtail"}
    if unknown:
        p.error(f"unknown --mixes {sorted(unknown)}; allowed: demo, longtail")
    if args.reps < 1 or args.batch < 1:
        p.error("--reps and --batch must be at least 1")
    return args


def build_model(out: Path, tokenizer_dir: Path, layers: int, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from learner.policy_init import save_model_dir

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_model_dir(LlamaForCausalLM(config), tokenizer, out, {"source": "bench", "layers": layers})


def demo_episodes(tokenizer_dir: Path):
    """Gold episodes of the demo world (seed and tools of deploy/configs/demo.yaml), real tokens and masks."""
    from transformers import AutoTokenizer

    from cluster.config import load_config
    from learner.batch import TrainSample
    from rollout.demo_world import build_demo_world
    from rollout.demonstrations import gold_trajectory
    from rollout.tools.corpus import CorpusBackend
    from rollout.tools.toolbox import Toolbox

    cfg = load_config(REPO / "deploy" / "configs" / "demo.yaml")
    world = build_demo_world(cfg.data.seed, cfg.data.demo.countries, cfg.data.demo.heldout_fraction, hops=(1, 2))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    toolbox = Toolbox.from_config(cfg.tools, CorpusBackend(world.documents, snippet_chars=cfg.tools.snippet_chars))

    async def build():
        return await asyncio.gather(*(gold_trajectory(q, world.plans[q.id], toolbox, tokenizer) for q in world.train))

    return [TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, 0.0, t.question_id)
            for t in asyncio.run(build()) if t is not None]


def longtail_episode(rng, vocab: int, max_len: int):
    """Prompt, then k (call, tool response) rounds and an answer; k geometric, so the tail is long."""
    from learner.batch import TrainSample

    calls = min(int(rng.geometric(0.4)) - 1, 10)
    ids, mask = [], []

    def add(n: int, trained: int) -> None:
        ids.extend(int(t) for t in rng.integers(3, vocab, size=n))
        mask.extend([trained] * n)

    add(int(rng.integers(180, 320)), 0)
    for _ in range(calls):
        add(int(rng.integers(30, 90)), 1)
        add(int(rng.integers(150, 450)), 0)
    add(int(rng.integers(20, 120)), 1)
    ids, mask = ids[:max_len], mask[:max_len]
    mask[-1] = 1
    return TrainSample(ids, mask, [-math.log(vocab)] * len(ids), 0.0)


def batches(mix: str, args, pool) -> list[list]:
    import numpy as np

    rng = np.random.default_rng([args.seed, len(mix)])
    out = []
    for _ in range(args.reps + 1):  # one untimed warm-up batch first
        if mix == "demo":
            picked = [pool[i] for i in rng.choice(len(pool), size=args.batch, replace=False)]
        else:
            picked = [longtail_episode(rng, SMOLLM2_135M["vocab_size"], args.max_len) for _ in range(args.batch)]
        for s in picked:
            s.advantage = float(rng.normal())
        out.append(picked)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch
    import transformers

    from cluster.config import LearnerConfig, default_cache_dir
    from cluster.model_prep import smollm2_base
    from learner.batch import padding_fraction, plan_step
    from learner.precision import detect_precision
    from learner.trainer import DistSpec, Trainer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # The learner's own choice (capability and cpuinfo flags: torch reports "AVX512" on CPUs whose
    # avx512_bf16 it does not name).
    bf16 = detect_precision("auto").bf16 if args.dtype == "auto" else args.dtype == "bf16-autocast"
    tokenizer_dir = smollm2_base(default_cache_dir(), log=print)
    pool = demo_episodes(tokenizer_dir) if "demo" in args.mixes else []
    work = {mix: batches(mix, args, pool) for mix in args.mixes}

    base = LearnerConfig(
        zero_stage=2, micro_batch_size=args.micro_batch, gradient_checkpointing=False, kl_coef=0.0, lr=1e-6,
        loss_agg="seq-mean-token-mean", autocast_bf16=bf16, torch_threads=args.threads,
    )
    with tempfile.TemporaryDirectory(prefix="rapo-learner-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, tokenizer_dir, args.layers, args.seed)
        trainer = Trainer(base, model_dir, DistSpec(0, 1, "127.0.0.1", free_port()), per_rank_micro_batches=1)
        print(f"model: random-init SmolLM2-135M shape with {args.layers} layers; "
              f"{'bf16 autocast (native bf16)' if bf16 else 'fp32'}; {torch.get_num_threads()} threads; "
              f"{args.batch} sequences/step; fixed micro-batch {args.micro_batch}; budget {args.max_tokens} tokens",
              flush=True)
        results: dict[str, dict[str, dict]] = {}
        try:
            for mix, steps in work.items():
                lens = sorted(len(s.token_ids) for b in steps for s in b)
                print(f"== {mix}: lengths min {lens[0]} median {lens[len(lens) // 2]} max {lens[-1]}", flush=True)
                res = {name: {"times": [], "pad": []} for name, *_ in SETTINGS}
                for rep, samples in enumerate(steps):
                    # Rotate the order each round, so no setting always runs first; round 0 is one warm-up step.
                    order = SETTINGS[rep % len(SETTINGS):] + SETTINGS[: rep % len(SETTINGS)] if rep else SETTINGS[-1:]
                    for name, packed, budget in order:
                        trainer.cfg = base.model_copy(update={"packing": packed})
                        plan = plan_step(samples, 1, 1, seed=rep, max_tokens=args.max_tokens if budget else None)[0]
                        micro = plan.mini_batches[0].micro(args.micro_batch)
                        t0 = time.perf_counter()
                        trainer.train_step(plan)
                        dt = time.perf_counter() - t0
                        tag = "warm-up" if rep == 0 else f"step {rep}/{args.reps}"
                        pad = padding_fraction(micro, packed)
                        useful = sum(len(s.token_ids) for s in samples)
                        print(f"  {tag:>10} {name:<14} {dt:7.2f} s  {len(micro):2d} micro-batches  "
                              f"pad {pad:5.1%}  {useful / dt:8.0f} useful tok/s", flush=True)
                        if rep:
                            res[name]["times"].append(dt)
                            res[name]["pad"].append(pad)
                results[mix] = res
        finally:
            trainer.close()

    print()
    print(f"{'mix':<9} {'setting':<14} {'step s':>8} {'useful tok/s':>13} {'pad':>6} {'vs padded+fixed':>16}")
    summary = {}
    for mix, res in results.items():
        rows = {}
        for name, *_ in SETTINGS:
            r = res[name]
            step = statistics.median(r["times"])
            rate = statistics.median(sum(len(s.token_ids) for s in b) / t for b, t in zip(work[mix][1:], r["times"]))
            rows[name] = (step, rate, statistics.mean(r["pad"]))
        ref = rows["padded+fixed"][1]
        for name, (step, rate, pad) in rows.items():
            print(f"{mix:<9} {name:<14} {step:8.2f} {rate:13.0f} {pad:6.1%} {rate / ref:15.2f}x")
        summary[mix] = rows
    for mix, rows in summary.items():
        print(f"{mix}: step time {rows['padded+fixed'][0]:.2f} s before (padded, {args.micro_batch} per micro-batch)"
              " -> "
              f"{rows['packed+fixed'][0]:.2f} s packed, {rows['packed+budget'][0]:.2f} s packed with a "
              f"{args.max_tokens}-token budget")
    last = summary.get("longtail") or next(iter(summary.values()))
    speedup = last["packed+budget"][1] / last["padded+fixed"][1]
    print(f"packed_speedup={speedup:.2f} pad_fraction_before={last['padded+fixed'][2]:.3f} "
          f"pad_fraction_after={last['packed+budget'][2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
