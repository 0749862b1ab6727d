"""Benchmark: the control plane at cluster scale, with generation and training that cost nothing.

The real controller (cluster/controller.py, as a Ray actor), its Redis stream, replay buffer
and pruning state, the reward pool (rule judge) and the simulated learner (learner.backend=
simulated, a 0 s step) run a real async pipeline. Only the rollout workers are stand-ins:
many light actors (num_cpus 0.01) that answer each group at once with trajectories of a real
episode's size (token ids, loss mask and behaviour logprobs of about --tokens tokens, the
number of turns drawn from the latency model's heavy-tailed tool-call counts, as the
simulated engine draws them). So everything measured is the control plane's own cost:

  controller CPU: the controller process' CPU seconds per group and per step (psutil on its
      pid), from the end of the warm-up steps to the end of the last step;
  Redis: commands per group (INFO commandstats delta over the same window; a pipeline sends
      several commands in one round trip) and the bytes per group Redis received;
  stream throughput: groups published to the stream per second;
  projection: overhead_fraction = controller CPU per group x groups per step / --step-s, the
      share of a GPU-scale step (default 60 s at 512 groups) the single controller is busy. At
      1 it is the bottleneck; the aim is <= 0.01.

The last line is

    overhead_fraction=X groups_per_s=Y

Everything shares this host's CPUs with whatever else runs: the figures are an upper bound of
the controller's cost (a busy host stretches CPU time too, through caches and scheduling).

    python bench/control_plane.py                                   # 32 workers, 512 groups x 8, 4k tokens
    python bench/control_plane.py --groups-per-step 128 --steps 3   # smaller and quicker
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from bench.sim_rollout_worker import SimRolloutWorker  # noqa: E402
from cluster.controller import Controller  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=32, help="rollout worker actors (light stand-ins)")
    p.add_argument("--groups-per-step", type=int, default=512, help="pipeline.questions_per_step")
    p.add_argument("--samples", type=int, default=8, help="pipeline.samples_per_question (episodes per group)")
    p.add_argument("--tokens", type=int, default=4096, help="mean tokens per episode")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps before the measurement starts")
    p.add_argument("--reward-actors", type=int, default=4, help="rewards.num_actors (rule judge)")
    p.add_argument("--step-s", type=float, default=60.0, help="the GPU-scale step the overhead is projected onto")
    p.add_argument("--projected-groups", type=int, default=512, help="groups per GPU-scale step in the projection")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: os.cpu_count())")
    args = p.parse_args(argv)
    for name in ("workers", "groups_per_step", "samples", "tokens", "steps", "reward_actors", "projected_groups"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < 2:
        p.error("--samples must be >= 2 (a GRPO group)")
    if args.warmup_steps < 0 or args.step_s <= 0:
        p.error("--warmup-steps must be >= 0 and --step-s > 0")
    return args


# --------------------------------------------------------------------------------------------
# Pure helpers


def overhead_fraction(cpu_s_per_group: float, groups_per_step: int, step_s: float) -> float:
    """The share of a step of ``step_s`` seconds that the controller spends on ``groups_per_step`` groups."""
    if step_s <= 0:
        raise ValueError("step_s must be > 0")
    return cpu_s_per_group * groups_per_step / step_s


def command_calls(commandstats: Mapping[str, Mapping[str, float]]) -> dict[str, int]:
    """Calls per command from redis-py's INFO commandstats reply ({"cmdstat_xadd": {"calls": 3, ...}})."""
    return {k.removeprefix("cmdstat_"): int(v.get("calls", 0)) for k, v in commandstats.items()}


def calls_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Calls per command between two command_calls snapshots (commands unseen before count from 0)."""
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


class _NoTracker:
    def log_metrics(self, metrics: dict, step: int) -> None:
        return None


class BenchController(Controller):
    """The controller with its rollout fleet made of SimRolloutWorkers and no tracking or evaluation."""

    async def setup_bench(self, workers: int, mean_tokens: int) -> dict:
        from actors.redis_client import async_client
        from actors.reward_pool import RewardPool
        from actors.rollout_fleet import RolloutFleet
        from cluster.data import load_run_data
        from learner.group_stream import GroupStream
        from learner.pruning import PruningState
        from learner.replay_buffer import ReplayBuffer
        from learner.scheduler import PromptScheduler

        cfg, ns = self.cfg, self.ctx.namespace
        self.data = load_run_data(cfg)
        self.questions = self.data.by_id()
        self.redis = async_client(self.ctx.redis_url, self.ctx.redis_password)
        self.stream = GroupStream(self.redis, ns)
        await self.stream.ensure()
        self.replay = ReplayBuffer(self.redis, ns, threshold=cfg.learner.replay_threshold,
                                   max_entries=cfg.learner.replay_max_entries)
        self.pruning = PruningState(self.redis, ns, threshold=cfg.learner.prune_threshold)
        self.scheduler = PromptScheduler([q.id for q in self.data.train], cfg.pipeline.seed, self.state.scheduler)
        limit = cfg.rollout.max_model_len

        def make(name: str):
            return SimRolloutWorker.options(name=name, num_cpus=0.01).remote(name, mean_tokens, limit)

        self.fleet = RolloutFleet(make, groups_per_worker=self._groups_per_worker())
        self.rewards = RewardPool.create(cfg.rewards, redis_url=None, redis_password=None, namespace=ns)
        self.learner = self._new_learner()
        await asyncio.gather(self.learner.setup(self.ctx.model_dir, cfg.micro_batches_per_rank, 1.0),
                             self.rewards.ready(), self.fleet.start(workers))
        self.tracker = _NoTracker()
        return {"pid": os.getpid(), "train_questions": len(self.data.train)}

    async def run_bench(self) -> dict:
        await self._pipeline()
        return dict(self.state.counts)

    def progress(self) -> dict:
        return {"step": self.state.step, "admitted": self.state.counts["admitted"]}


# --------------------------------------------------------------------------------------------
# The run


def bench_config(args, model_dir: str):
    from cluster.config import load_config

    steps = args.warmup_steps + args.steps
    return load_config(ROOT / "deploy/configs/smoke.yaml", [
        "rollout.engine=simulated", "learner.backend=simulated", "learner.sim_step_s=0",
        f"pipeline.questions_per_step={args.groups_per_step}", f"pipeline.samples_per_question={args.samples}",
        f"pipeline.steps={steps}", "pipeline.mode=async", "pipeline.max_staleness=1",
        # Every admitted group may be in flight at once: generation is free, the controller is what is measured.
        f"pipeline.groups_per_worker={max(1, math.ceil(2 * args.groups_per_step / args.workers))}",
        f"rollout.max_model_len={max(2 * args.tokens, 2048)}", "rollout.max_tokens_per_turn=512",
        f"rewards.num_actors={args.reward_actors}", "rewards.num_cpus_per_actor=0.01",
        "learner.num_cpus_per_rank=0.01", "learner.checkpoint_every=0", f"learner.micro_batch_size={args.samples}",
        "data.demo.countries=200", f"model.path={model_dir}",
    ])


async def sample(controller, redis, published_key: str, pid: int):
    import psutil

    proc = psutil.Process(pid)
    t = proc.cpu_times()
    info = await redis.info("commandstats")
    stats = await redis.info("stats")
    return {"t": time.perf_counter(), "cpu": t.user + t.system, "calls": command_calls(info),
            "published": int(await redis.scard(published_key)), "net_in": int(stats.get("total_net_input_bytes", 0)),
            "progress": await controller.progress.remote()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.controller import RunContext
    from cluster.redis_server import start_redis

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # A shared host may sit near its memory limit because of other work: Ray's memory monitor would then
    # kill these light actors. The kernel still guards the host.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    work = Path(tempfile.mkdtemp(prefix="rapo-control-plane-"))
    redis_srv = start_redis(work / "redis")
    ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "1"}})
    try:
        (work / "model").mkdir()
        cfg = bench_config(args, str(work / "model"))
        ns = "bench-cp"
        ctx = RunContext("bench-cp", str(work / "out"), str(work / "model"), redis_srv.url, redis_srv.password, ns,
                         "", str(work / "weights"))
        (work / "out").mkdir()
        actor = ray.remote(BenchController).options(num_cpus=0, max_concurrency=64).remote(cfg, ctx)
        t_setup = time.perf_counter()
        info = ray.get(actor.setup_bench.remote(args.workers, args.tokens))
        print(f"{args.workers} rollout workers, {args.reward_actors} reward actors, simulated learner ready in "
              f"{time.perf_counter() - t_setup:.0f} s; {args.groups_per_step} groups x {args.samples} episodes of "
              f"~{args.tokens} tokens per step, {args.warmup_steps} warm-up + {args.steps} measured steps", flush=True)
        r = asyncio.run(measure(args, actor, info["pid"], redis_srv, ns))
    finally:
        ray.shutdown()
        redis_srv.stop()
    return report(args, r)


async def _await(ref):
    return await ref


async def measure(args, actor, pid: int, redis_srv, ns: str) -> dict:
    from actors.redis_client import async_client

    redis = async_client(redis_srv.url, redis_srv.password)
    published_key = f"{ns}:groups:published"
    run = asyncio.ensure_future(_await(actor.run_bench.remote()))
    first = last = None
    steps: list[dict] = []
    try:
        while not run.done():
            s = await sample(actor, redis, published_key, pid)
            step = s["progress"]["step"]
            if step >= args.warmup_steps and first is None:
                first = s
            if first is not None and (not steps or steps[-1]["progress"]["step"] < step):
                steps.append(s)
                print(f"  step {step}: {s['published']} groups published, controller CPU {s['cpu']:.1f} s", flush=True)
            if step >= args.warmup_steps + args.steps:
                last = s
                break
            await asyncio.sleep(0.2)
        await run
        if first is not None and last is None:
            # The last step ended between two samples (a fast control plane): the run is over, so this
            # sample is its end; the window only grows, so the rates stay conservative.
            last = await sample(actor, redis, published_key, pid)
            if last["progress"]["step"] < args.warmup_steps + args.steps:
                last = None
    finally:
        await redis.aclose()
    if first is None or last is None:
        raise SystemExit("the run ended before the measured steps")
    return {"first": first, "last": last, "steps": steps}


def report(args, r: dict) -> int:
    first, last = r["first"], r["last"]
    groups = last["published"] - first["published"]
    wall = last["t"] - first["t"]
    cpu = last["cpu"] - first["cpu"]
    steps = last["progress"]["step"] - first["progress"]["step"]
    calls = calls_delta(first["calls"], last["calls"])
    per_group = cpu / max(1, groups)
    frac = overhead_fraction(per_group, args.projected_groups, args.step_s)
    gps = groups / wall if wall > 0 else 0.0
    print(f"measured over {steps} steps, {wall:.1f} s: {groups} groups published ({gps:.1f} groups/s)")
    print(f"controller CPU: {cpu:.2f} s = {1000 * per_group:.2f} ms per group, {cpu / max(1, steps):.2f} s per step "
          f"of {args.groups_per_step} groups; busy {cpu / wall:.0%} of the wall time")
    total = sum(calls.values())
    top = ", ".join(f"{k} {v / max(1, groups):.2f}" for k, v in list(calls.items())[:8])
    print(f"Redis: {total / max(1, groups):.1f} commands per group ({top}); "
          f"{(last['net_in'] - first['net_in']) / max(1, groups) / 1024:.0f} KiB received per group")
    print(f"projection: {args.projected_groups} groups per {args.step_s:g} s GPU-scale step -> the controller is busy "
          f"{frac:.1%} of the step; stream capacity {gps:.0f} groups/s vs {args.projected_groups / args.step_s:.1f} "
          "needed")
    print(f"(a shared host: CPU times are upper bounds; host load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"overhead_fraction={frac:.3f} groups_per_s={gps:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
