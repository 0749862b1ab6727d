"""Precision benchmark: one warm-start step and one learner step, bf16 autocast vs fp32, side by side.

Runs the demo config's real work on this machine's CPU: a supervised warm-start step
(SmolLM2-135M, demo-world demonstrations, batch of warm_start.batch_size) and a RAPO learner
step (learner.trainer.Trainer under DeepSpeed ZeRO, one rank, the demo's micro-batching, one
batch of questions_per_step x samples_per_question sequences). The two precisions alternate
within every repetition, so load from other processes hits both alike. Prints a table of
median seconds and the fp32/bf16 ratio, and which precision `auto` picks here.

    python bench/precision.py --reps 2

`--linear` times only a reference op (`nn.Linear(576, 1536)` forward+backward on 512 rows, one
thread, best of 100), fp32 against bf16 autocast. A 2-core AVX512 CPU without native bf16 took 27
and 106 ms (README, Benchmarks), so this compares a CPU with that one, or checks a stand-in for
it (oneDNN and ATen held to AVX512: `ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE`).
Last line `linear_fp32_ms=X linear_bf16_ms=Y bf16_over_fp32=Z`.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_start_step(base: Path, samples, cfg, bf16: bool, batch_size: int) -> float:
    """Seconds of the second supervised step (the first one also pays one-off allocations)."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.warm_start import supervised_warm_start

    ws = cfg.model.warm_start
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stamps: list[float] = []
    t0 = time.perf_counter()
    supervised_warm_start(model, samples, steps=2, batch_size=batch_size, lr=ws.lr, seed=ws.seed, pad_id=0,
                          bf16=bf16, on_step=lambda s, loss: stamps.append(time.perf_counter()))
    return stamps[1] - stamps[0] if len(stamps) > 1 else stamps[0] - t0


def best_seconds(fn, reps: int) -> float:
    """Fastest of reps calls after one warm-up: the least disturbed by other load on the machine."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def linear_reference(reps: int = 100) -> tuple[float, float]:
    """fp32 and bf16-autocast seconds of one nn.Linear(576, 1536) forward+backward on 512 rows."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer = torch.nn.Linear(576, 1536)
        x = torch.randn(512, 576, requires_grad=True)

        def step(bf16: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = layer(x)
            y.float().sum().backward()

        return best_seconds(lambda: step(False), reps), best_seconds(lambda: step(True), reps)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "deploy/configs/demo.yaml"))
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each (bf16, fp32) pair")
    parser.add_argument("--warm-start-batch", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--learner-sequences", type=int, default=None, help="default: the config's step batch")
    parser.add_argument("--skip-learner", action="store_true")
    parser.add_argument("--skip-warm-start", action="store_true")
    parser.add_argument("--linear", action="store_true", help="only the reference nn.Linear op (seconds)")
    args = parser.parse_args()

    if args.linear:
        import torch

        from learner.precision import detect_precision

        auto = detect_precision("auto", "cpu")
        print(f"torch capability {torch.backends.cpu.get_cpu_capability()}; auto picks {auto.name} ({auto.reason})")
        fp32, bf16 = linear_reference()
        print(f"linear_fp32_ms={fp32 * 1e3:.1f} linear_bf16_ms={bf16 * 1e3:.1f} bf16_over_fp32={bf16 / fp32:.2f}")
        return

    import numpy as np
    from transformers import AutoTokenizer

    from cluster.config import load_config
    from cluster.model_prep import demonstration_samples, smollm2_base
    from learner.batch import TrainSample, plan_step
    from learner.precision import Precision, detect_precision

    cfg = load_config(args.config)
    auto = detect_precision("auto", "cpu")
    print(f"auto picks: {auto.name} ({auto.reason})", flush=True)
    base = smollm2_base(Path(cfg.model.cache_dir).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(base)
    samples = demonstration_samples(cfg, tokenizer)
    print(f"{len(samples)} demonstration episodes, mean {np.mean([len(s.token_ids) for s in samples]):.0f} tokens",
          flush=True)

    ws_batch = args.warm_start_batch or cfg.model.warm_start.batch_size
    n_learner = args.learner_sequences or cfg.train_batch_size
    times: dict[tuple[str, bool], list[float]] = {}
    for rep in range(0 if args.skip_warm_start else args.reps):
        for bf16 in (True, False):
            t = warm_start_step(base, samples, cfg, bf16, ws_batch)
            times.setdefault(("warm-start step", bf16), []).append(t)
            print(f"rep {rep}: warm-start step {'bf16' if bf16 else 'fp32'} {t:.1f} s", flush=True)

    if not args.skip_learner:
        from learner.trainer import DistSpec, Trainer

        rng = np.random.default_rng(0)
        batch = [samples[i % len(samples)] for i in range(n_learner)]
        rl = [TrainSample(s.token_ids, s.loss_mask, None, float(rng.normal()), s.question_id) for s in batch]
        plans = plan_step(rl, 1, cfg.learner.mini_batches, seed=0)
        trainer = Trainer(cfg.learner, base, DistSpec(0, 1, "127.0.0.1", _free_port()),
                          per_rank_micro_batches=n_learner // cfg.learner.micro_batch_size,
                          temperature=cfg.rollout.temperature)
        try:
            trainer.train_step(plans[0])  # warm-up: DeepSpeed's first step allocates optimizer state
            for rep in range(args.reps):
                for bf16 in (True, False):
                    trainer.precision = Precision(bf16, "bench")
                    t = trainer.train_step(plans[0])["train_time_s"]
                    times.setdefault(("learner step", bf16), []).append(t)
                    print(f"rep {rep}: learner step {'bf16' if bf16 else 'fp32'} {t:.1f} s", flush=True)
        finally:
            trainer.close()

    print(f"\n| operation (warm start: {ws_batch} seqs, learner: {n_learner} seqs) | bf16 autocast s | fp32 s "
          "| fp32/bf16 |")
    print("|---|---|---|---|")
    for op in dict.fromkeys(k[0] for k in times):
        b, f = statistics.median(times[(op, True)]), statistics.median(times[(op, False)])
        print(f"| {op} | {b:.1f} | {f:.1f} | {f / b:.2f} |")
    print(f"auto on this machine: {auto.name}")


if __name__ == "__main__":
    main()
