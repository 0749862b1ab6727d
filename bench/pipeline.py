"""Pipeline benchmark: the same workload in sync and async mode, side by side in one run.

Two modes:

- ``latency`` (default): model compute is replaced by a latency model of GPU-scale phases
  (rollout.engine=simulated, learner.backend=simulated): per-token decode time with a fixed
  number of decode slots per worker, a tool latency, heavy-tailed tool-call counts and a
  training step time, all scaled down in time (--time-scale). Everything else is the real
  pipeline: Ray actors, the Redis stream, the reward pool, weight publication. It sweeps
  1, 2, 4, 8 rollout workers.
- ``real``: the tiny model on vLLM + DeepSpeed (deploy/configs/smoke.yaml), sync vs async.

For each pair it prints the measured phase times, the speedup (sync step time / async step
time), the ideal bound and the efficiency = speedup / ideal, plus the rollout and learner
idle fractions. The ideal bound is the sync step time divided by
max(generation time per step with every rollout worker fully busy, train + weight-sync time
per step). "Fully busy" means every decode slot of every worker decoding: the generation
work of a step (its episodes' decode time) spread evenly over workers x slots. Sync mode
also waits for the longest episode of each batch; async mode should recover that tail.

The last line reports the latency-model mode at its default settings:
    async_speedup=X ideal=Y efficiency=Z
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# GPU-scale phases of a Qwen3-4B search agent on H100s (the paper's setting), before scaling:
# ~40 tokens/s per sequence while decoding in a batch, ~300 tokens per assistant turn, ~2.5 s
# per tool call (search API / page fetch + extraction), Pareto-tailed tool calls per episode
# (median ~2, long tail to 24), and a ~90 s learner step for 32 x 5 episodes on 4 GPUs.
GPU_SCALE = {
    "per_token_s": 0.025,
    "tokens_per_turn": 300,
    "tool_latency_s": 2.5,
    "train_step_s": 90.0,
    "weight_sync_s": 4.0,
}


@dataclass
class Workload:
    time_scale: float
    slots: int
    questions: int
    samples: int
    steps: int
    max_staleness: int

    def overrides(self) -> list[str]:
        s = self.time_scale
        return [
            "rollout.engine=simulated", "learner.backend=simulated",
            f"rollout.latency_model.per_token_s={GPU_SCALE['per_token_s'] / s}",
            f"rollout.latency_model.tokens_per_turn={GPU_SCALE['tokens_per_turn']}",
            f"rollout.latency_model.slots={self.slots}",
            f"rollout.latency_model.weight_sync_s={GPU_SCALE['weight_sync_s'] / s}",
            "rollout.latency_model.prefill_per_token_s=0",
            f"tools.latency_s={GPU_SCALE['tool_latency_s'] / s}",
            f"learner.sim_step_s={GPU_SCALE['train_step_s'] / s}",
            f"pipeline.questions_per_step={self.questions}", f"pipeline.samples_per_question={self.samples}",
            f"pipeline.steps={self.steps}", f"pipeline.max_staleness={self.max_staleness}",
            # Four times the decode slots in flight per worker: an episode waiting on a tool, or done and
            # waiting for the rest of its group, leaves its slot to another; far more would only make
            # episodes wait in the slot queue and grow stale.
            f"rollout.max_concurrent_episodes={4 * self.slots}",
            "rollout.max_tool_calls=32", "rollout.num_cpus_per_worker=0.25",
            "data.eval_size=4", "learner.micro_batch_size=1", "tracking.plots=false",
        ]

    def decode_s_per_turn(self) -> float:
        return GPU_SCALE["per_token_s"] / self.time_scale * GPU_SCALE["tokens_per_turn"]


@dataclass
class Measured:
    step_s: float
    wait_s: float
    train_s: float
    sync_s: float
    turns: float
    rollout_idle: float
    learner_idle: float
    dropped: int
    lost: int


def run(config: str, overrides: list[str], out: Path) -> Measured:
    cmd = [sys.executable, "-m", "cluster.cli", "run", config, "--output-dir", str(out), *overrides]
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if code != 0:
        raise SystemExit(f"run failed (exit {code}): {' '.join(cmd)}; see {out.with_suffix('.log')}")
    steps = json.loads((out / "history.json").read_text())["steps"]
    summary = json.loads((out / "summary.json").read_text())
    # The first steps include start-up effects (empty queue, first weight push): skip them.
    warm = steps[2:] if len(steps) > 4 else steps
    m = lambda key: statistics.mean(h[key] for h in warm)  # noqa: E731
    return Measured(
        step_s=m("time/step_s"), wait_s=m("time/wait_s"), train_s=m("time/train_s"), sync_s=m("time/weight_sync_s"),
        turns=m("train/turns"), rollout_idle=steps[-1].get("pipeline/rollout_idle_fraction", 0.0),
        learner_idle=steps[-1].get("pipeline/learner_idle_fraction", 0.0), dropped=summary["dropped_stale_groups"],
        lost=summary["lost_episodes"],
    )


def compare(label: str, sync: Measured, asyn: Measured, gen_busy_s: float | None) -> tuple[float, float, float]:
    train_s = sync.train_s + sync.sync_s
    ideal = sync.step_s / max(gen_busy_s, train_s) if gen_busy_s is not None else sync.step_s / train_s
    speedup = sync.step_s / asyn.step_s
    eff = speedup / ideal
    print(f"{label}")
    print(
        f"  sync : step {sync.step_s:7.2f} s = wait for data {sync.wait_s:6.2f} s + train {sync.train_s:6.2f} s + "
        f"weight sync {sync.sync_s:5.2f} s | rollout idle {sync.rollout_idle:4.0%} "
        f"learner idle {sync.learner_idle:4.0%}"
    )
    print(
        f"  async: step {asyn.step_s:7.2f} s = wait for data {asyn.wait_s:6.2f} s + train {asyn.train_s:6.2f} s + "
        f"weight sync {asyn.sync_s:5.2f} s | rollout idle {asyn.rollout_idle:4.0%} "
        f"learner idle {asyn.learner_idle:4.0%}"
    )
    busy = f"{gen_busy_s:.2f} s" if gen_busy_s is not None else "n/a"
    print(
        f"  generation per step with every worker busy {busy}, train+sync {train_s:.2f} s | dropped stale groups "
        f"{asyn.dropped}, lost episodes {sync.lost + asyn.lost}"
    )
    print(f"  speedup {speedup:.2f}  ideal {ideal:.2f}  efficiency {eff:.2f}")
    return speedup, ideal, eff


def latency_mode(args, out: Path) -> tuple[float, float, float]:
    w = Workload(args.time_scale, args.slots, args.questions, args.samples, args.steps, args.max_staleness)
    print(
        f"latency model (GPU-scale phases / {args.time_scale:g}): {GPU_SCALE}; {w.slots} decode slots per worker; "
        f"batch {w.questions} questions x {w.samples}; max_staleness {w.max_staleness}"
    )
    result = None
    for workers in args.workers:
        measured = {}
        for mode in ("sync", "async"):
            measured[mode] = run(
                "deploy/configs/smoke.yaml",
                [*w.overrides(), f"rollout.num_workers={workers}", f"pipeline.mode={mode}"],
                out / f"latency-w{workers}-{mode}",
            )
        episodes = w.questions * w.samples
        gen_busy = episodes * measured["sync"].turns * w.decode_s_per_turn() / (workers * w.slots)
        r = compare(f"{workers} rollout worker(s)", measured["sync"], measured["async"], gen_busy)
        if workers == args.default_workers:
            result = r
    return result


def real_mode(args, out: Path) -> None:
    base = [
        "pipeline.steps=8",
        "pipeline.questions_per_step=4",
        "pipeline.samples_per_question=4",
        f"pipeline.max_staleness={args.max_staleness}",
    ]
    measured = {
        mode: run("deploy/configs/smoke.yaml", [*base, f"pipeline.mode={mode}"], out / f"real-{mode}")
        for mode in ("sync", "async")
    }
    # A real engine has no slot count to spread work over; the ideal here bounds by training alone.
    compare(
        "real model (tiny random Llama on vLLM + DeepSpeed ZeRO-2, 1 rollout worker)",
        measured["sync"],
        measured["async"],
        None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["latency", "real", "both"], default="both")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--default-workers", type=int, default=4, help="the sweep point reported on the last line")
    p.add_argument("--time-scale", type=float, default=40.0, help="GPU-scale phase times are divided by this")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--questions", type=int, default=32, help="the paper's batch: 32 questions x 5 rollouts")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--out", default="runs/bench-pipeline")
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.mode in ("real", "both"):
        real_mode(args, out)
    if args.mode in ("latency", "both"):
        speedup, ideal, eff = latency_mode(args, out)
        print(f"async_speedup={speedup:.2f} ideal={ideal:.2f} efficiency={eff:.2f}")


if __name__ == "__main__":
    main()
