"""Benchmark: the reward-labeller pool against a slow, flaky OpenAI-compatible judge (issue 4).

N synthetic trajectories go through RewardPool.score on a local Ray, against the repo's
OpenAITestServer (tests/servers/openai_server.py) with 200 ms latency and 5% HTTP errors
(429/500). It prints the achieved judge throughput, the ideal, their ratio, and the rewards
lost or duplicated; the last line is

    throughput_ratio=X lost=N duplicated=N steady_ratio=S perfect_ratio=P

Definitions (also printed):
  total concurrency C = actors x min(rewards.max_in_flight_per_actor, judge.max_in_flight): the
      HTTP calls the pool can have open at once (the actor's gate and its judge client's
      semaphore both bound it). The benchmark sets judge.max_in_flight = --in-flight-per-actor
      and max_in_flight_per_actor = that + --queue-per-actor, so C = actors x in-flight-per-actor
      and each actor holds a few queued trajectories that take a freed HTTP slot at once; the
      server's measured peak in flight shows that C is what actually runs. The defaults (16 + 16
      = 32 per actor, chunks of 4) are RewardsConfig's and JudgeSettings' own defaults.
  ideal = C / latency: judge calls per second if every slot always held a call.
  achieved = successful judge calls (HTTP 200 from the server) / wall time of pool.score.
  throughput_ratio = achieved / ideal (the issue's definition). A failed call occupies a slot
      for the full latency too, so even a perfect pool reaches at most (1 - error_rate) of the
      ideal in successful calls; the error-adjusted ideal = ideal x (1 - error_rate) and the
      ratio against it are printed for information only.
  steady_ratio = the same ratio over the run's middle, from the first latency to the arrival of
      the last judgement's first call: the pool's throughput while it had new work to start,
      without the ramp and the batch's tail (where a pool fed continuously, as in a run, is not).
  perfect_ratio = the ratio a zero-overhead pool would reach on this batch (simulated); the
      finite batch's tail keeps it below 1 - error_rate.
  --timeline splits the run's slot-seconds into busy, ramp, batch tail, client overhead and
      dispatch gaps (see CapacityLoss), and prints the server's in-flight per 100 ms.
  lost = trajectories that got no reward; duplicated = results the pool dropped as arriving
      twice (PoolReport.duplicates) + trajectories whose reward was applied more than once.

Every trajectory's judged content (question, gold, answer, tool calls) is unique, and the judge
cache is off, so neither the Redis cache nor the client's coalescing of identical in-flight
judgements can inflate the figures. A warm-up batch (not timed) starts the actors' judge
clients and their connection pools first.

Everything (test server thread, Ray, actors) shares this host's CPUs; the table shows how busy
the host was and how much CPU the benchmark itself used per HTTP call, because on a small or
busy host the pool becomes CPU-bound before it is latency-bound. The exit status is 1 when a
reward was lost or duplicated, else 0 (the ratio depends on the host).

    python bench/judge_pool.py                       # stage 1: one call per trajectory
    python bench/judge_pool.py --stage 2             # answer + step labels: two calls each
    python bench/judge_pool.py --group-size 8        # one pool.score call per group, as the controller
    python bench/judge_pool.py --kill-actor          # kill judge-0 mid-run: nothing may be lost
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import secrets
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.servers is not an installed package

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

CHAT_PATH = "/v1/chat/completions"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    # 4000 (about 14 s at the defaults): at 1000 the run lasts 4 s, so its steady window is short beside
    # the ramp and a retry's backoff (up to 1 s), and a zero-overhead pool itself reaches only 0.86.
    p.add_argument("--trajectories", type=int, default=4000, help="trajectories scored in the timed run")
    p.add_argument("--actors", type=int, default=4, help="reward-labeller actors (rewards.num_actors)")
    p.add_argument(
        "--in-flight-per-actor",
        type=int,
        default=16,
        help="HTTP calls one actor keeps open: judge.max_in_flight (and the floor of rewards.max_in_flight_per_actor)",
    )
    p.add_argument(
        "--queue-per-actor",
        type=int,
        default=16,
        help="trajectories dealt to each actor beyond its HTTP slots: rewards.max_in_flight_per_actor = "
        "in-flight-per-actor + this, judge.max_in_flight = in-flight-per-actor, so a freed HTTP slot "
        "is refilled inside the actor instead of after a Ray round trip to the pool (0: no queue)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=4,
        help="rewards.chunk_size: trajectories per actor call (the pool keeps max_in_flight_per_actor // "
        "chunk_size chunks per actor; a chunk returns when its slowest trajectory is done)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="score the batch as concurrent pool.score calls of this many trajectories, as the controller "
        "does (one call per group); 0: one call for the whole batch",
    )
    p.add_argument("--latency", type=float, default=0.2, help="server latency per chat request, seconds")
    p.add_argument("--error-rate", type=float, default=0.05, help="fraction of requests answered 429 or 500")
    p.add_argument(
        "--stage", type=int, choices=(1, 2), default=1, help="2: answer + step labels, two calls per trajectory"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the server's fault choice")
    p.add_argument("--max-retries", type=int, default=4, help="judge.max_retries")
    p.add_argument(
        "--backoff-base", type=float, default=0.05, help="judge.backoff_base_s (equal jitter, doubled per retry)"
    )
    p.add_argument("--backoff-max", type=float, default=1.0, help="judge.backoff_max_s")
    p.add_argument("--timeout", type=float, default=10.0, help="judge.timeout_s")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up trajectories (default: the total concurrency)"
    )
    p.add_argument(
        "--kill-actor", action="store_true", help="kill judge-0 (Ray restarts it) once a third of the calls are done"
    )
    p.add_argument(
        "--timeline",
        action="store_true",
        help="where the capacity went (busy, ramp, batch tail, client overhead, dispatch gaps, backoff) and "
        "the server's mean in-flight per 100 ms of the timed run",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: os.cpu_count())")
    args = p.parse_args(argv)
    for name in ("trajectories", "actors", "in_flight_per_actor", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.group_size < 0:
        p.error("--group-size must be >= 0")
    if args.queue_per_actor < 0:
        p.error("--queue-per-actor must be >= 0")
    if args.latency <= 0:
        p.error("--latency must be > 0 (the ideal is concurrency / latency)")
    if not 0 <= args.error_rate < 1:
        p.error("--error-rate must be in [0, 1)")
    return args


# --------------------------------------------------------------------------------------------
# Synthetic work: every judged case unique


def make_batch(n: int, tag: str, stage: int):
    """n trajectories on n distinct questions; half answer correctly; 1-3 distinct tool calls each."""
    from rollout.types import Question, ToolCall, Trajectory

    questions, trajs = {}, []
    for i in range(n):
        qid = f"{tag}-{i}"
        q = Question(qid, f"Who founded the settlement {tag}-{i}?", f"Founder {tag} {i}")
        questions[qid] = q
        calls = [
            ToolCall(
                "search_urls",
                {"query": f"settlement {tag}-{i} founder"},
                urls=[f"https://a.example/{tag}/{i}", f"https://b.example/{tag}/{i}"],
            ),
            ToolCall(
                "query_url",
                {"url": f"https://a.example/{tag}/{i}", "goal": f"founder of {tag}-{i}"},
                urls=[f"https://a.example/{tag}/{i}"],
            ),
            ToolCall(
                "query_url",
                {"url": f"https://b.example/{tag}/{i}", "goal": f"founder of {tag}-{i}"},
                urls=[f"https://b.example/{tag}/{i}"],
            ),
        ][: 1 + i % 3]
        answer = q.answer if i % 2 == 0 else f"Impostor {tag} {i}"
        trajs.append(
            Trajectory(
                qid,
                0,
                [1, 2, 3],
                [0, 1, 1],
                [0.0, -0.1, -0.2],
                1,
                tool_calls=calls,
                answer=answer,
                format_ok=i % 4 != 3,
                num_turns=len(calls) + 1,
            )
        )
    return trajs, questions


def expected_reward(traj, question, spec) -> float:
    """What the test server's rule-following judge (and the rule fallback) give."""
    from rewards.answer import rule_judge
    from rewards.labeller import rule_labels
    from rewards.scoring import spec_reward

    correct = rule_judge(traj.answer, question.golds())
    labels = [] if spec.stage == 1 else rule_labels(traj.tool_calls, budget_verification=spec.budget_verification)
    return spec_reward(spec, traj.format_ok, correct, labels)


# --------------------------------------------------------------------------------------------
# Measurement helpers


class InFlightSampler:
    """Samples the server's open chat requests about every `every_s` (the server thread updates the count)."""

    def __init__(self, server, every_s: float = 0.005):
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, int]] = []  # (perf_counter, requests in flight)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            # A plain int read; the server's lock guards its writes. There is no public accessor for it.
            self.samples.append((time.perf_counter(), self.server._in_flight))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def mean(self, start: float | None = None, end: float | None = None) -> float:
        """Time-weighted mean in flight over [start, end) (a loaded host stretches the sampling interval)."""
        pts = [(t, n) for t, n in self.samples if (start is None or t >= start) and (end is None or t < end)]
        if len(pts) < 2:
            return float(pts[0][1]) if pts else 0.0
        weighted = sum(n * (t2 - t1) for (t1, n), (t2, _) in itertools.pairwise(pts))
        return weighted / (pts[-1][0] - pts[0][0])

    @property
    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole host from /proc/stat; None where there is no /proc."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of this process and its descendants (Ray's raylet, GCS and workers), by role."""
    try:
        import psutil  # Ray depends on it
    except ImportError:
        return {}
    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        role = "driver" if proc.pid == me.pid else "actors" if "RewardLabeller" in title else "ray"
        out[proc.pid] = (role, t.user + t.system)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> Counter:
    used: Counter = Counter()
    for pid, (role, seconds) in after.items():
        used[role] += seconds - before.get(pid, (role, 0.0))[1]
    return used


@dataclass(frozen=True)
class CallRecord:
    """One judge HTTP call as the server saw it: arrival (bench clock), status, and which judgement it was."""

    at: float
    ok: bool
    prompt: str  # the exact prompt: a retry repeats it


@dataclass(frozen=True)
class CapacityLoss:
    """Where the slot-seconds of a timed run went (slots x wall), in the bench's clock.

    busy: a call on the server. The idle rest, by period: ramp (before the slots first fill, or
    one latency), tail (after the last judgement's first call arrived: no new work left to
    start, a finite batch's end), middle (the pool had work to start: its own losses). In the
    middle, client_overhead is the slot-seconds a client held its HTTP slot while the server did not hold the call
    (building, sending, reading, event-loop lag), from the clients' own call timing; backoff is
    the slot-seconds judgements spent waiting to retry, which idles a slot only where the actor
    had nothing else queued.
    """

    capacity: float
    busy: float
    ramp: float
    tail: float
    middle: float
    backoff: float
    client_overhead: float
    middle_window: tuple[float, float]
    middle_ok: int

    @property
    def dispatch_gap(self) -> float:
        """Middle idle time that client overhead does not explain: no call ready where a slot was free
        (chunking, Ray round trips to and from the actors, an actor's queue empty while its
        judgements wait to retry, the actors' event loops)."""
        return max(0.0, self.middle - self.client_overhead)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def attribute_capacity(
    calls: list[CallRecord],
    latency: float,
    slots: int,
    start: float,
    end: float,
    *,
    full_at: float | None = None,
    client_call_s: float | None = None,
) -> CapacityLoss:
    """Split the run's slot-seconds (see CapacityLoss). ``full_at``: when the server first held
    ``slots`` calls (default: start + latency); ``client_call_s``: the clients' mean time per call
    with the HTTP slot held (default: latency, no overhead)."""
    if end <= start or slots < 1 or latency <= 0:
        raise ValueError("need end > start, slots >= 1 and latency > 0")
    by_prompt: dict[str, list[CallRecord]] = {}
    for c in sorted(calls, key=lambda c: c.at):
        by_prompt.setdefault(c.prompt, []).append(c)
    ramp_end = min(end, full_at if full_at is not None else start + latency)
    supply_end = max((cs[0].at for cs in by_prompt.values()), default=start)
    supply_end = min(end, max(ramp_end, supply_end))

    def busy_in(a: float, b: float) -> float:
        return sum(_overlap(c.at, c.at + latency, a, b) for c in calls)

    busy = busy_in(start, end)
    idle = lambda a, b: slots * (b - a) - busy_in(a, b)  # noqa: E731
    backoff = sum(
        _overlap(prev.at + latency, nxt.at, ramp_end, supply_end)
        for cs in by_prompt.values()
        for prev, nxt in itertools.pairwise(cs)
    )
    middle_calls = sum(1 for c in calls if ramp_end <= c.at + latency <= supply_end)
    overhead = middle_calls * max(0.0, (client_call_s if client_call_s is not None else latency) - latency)
    middle_ok = sum(1 for c in calls if c.ok and ramp_end <= c.at + latency <= supply_end)
    return CapacityLoss(
        slots * (end - start),
        busy,
        idle(start, ramp_end),
        idle(supply_end, end),
        idle(ramp_end, supply_end),
        backoff,
        overhead,
        (ramp_end, supply_end),
        middle_ok,
    )


def capacity_loss(r: dict, latency: float) -> CapacityLoss:
    """attribute_capacity over the timed run's server records, in the bench's clock."""
    calls = [CallRecord(rec.at - r["clock_offset"], rec.status == 200, _prompt_key(rec.body)) for rec in r["records"]]
    full = next((t for t, n in r["sampler"].samples if t >= r["t0"] and n >= r["conc"]), None)
    d = r["stats_delta"]
    client_call_s = d["latency_sum_s"] / d["latency_count"] if d.get("latency_count") else None
    return attribute_capacity(
        calls, latency, r["conc"], r["t0"], r["wall_end"], full_at=full, client_call_s=client_call_s
    )


def _prompt_key(body) -> str:
    import json

    return json.dumps(body.get("messages"), sort_keys=True) if isinstance(body, dict) else ""


def print_capacity_loss(console, loss: CapacityLoss, slots: int) -> None:
    """The --timeline view: where the slot-seconds went, as fractions of the run's capacity."""
    from rich.table import Table

    table = Table(title=f"where the capacity went ({loss.capacity:.1f} slot-seconds = {slots} slots x wall)")
    table.add_column("slot-seconds")
    table.add_column("share", justify="right")
    table.add_column("what")
    for name, value, what in (
        ("busy on the server", loss.busy, "a call held by the server (successful or failed)"),
        ("ramp", loss.ramp, "idle before the slots first filled"),
        ("batch tail", loss.tail, "idle after the last judgement's first call: nothing new to start (finite batch)"),
        (
            "middle: client overhead",
            loss.client_overhead,
            "HTTP slot held by a client while the server did not hold the call (request build/send, reply read, "
            "event-loop lag)",
        ),
        (
            "middle: dispatch gaps",
            loss.dispatch_gap,
            "a slot free with no call ready: chunking, Ray round trips, an actor's queue empty, its event loop",
        ),
        (
            "(middle: waiting to retry)",
            loss.backoff,
            "judgements in backoff; idles a slot only if nothing else was queued",
        ),
    ):
        table.add_row(name, f"{value / loss.capacity:.1%}", what)
    console.print(table)


async def score_in_groups(pool, trajs, questions, group_size: int):
    """pool.score over the batch in one call (group_size 0), or in concurrent calls of group_size
    trajectories (the controller's pattern), their reports summed into one."""
    if group_size <= 0:
        return await pool.score(trajs, questions)
    from rewards.report import PoolReport

    reports = await asyncio.gather(
        *(pool.score(trajs[i : i + group_size], questions) for i in range(0, len(trajs), group_size))
    )
    total = PoolReport()
    for r in reports:
        for name in ("scores", "resubmitted", "duplicates", "actor_failures", "retries", "fallbacks", "latency_s"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
        total.sources.update(r.sources)
        total.labels.update(r.labels)
    return total


def count_applications():
    """Wraps actors.reward_pool.apply_score (looked up at call time) to count rewards applied per trajectory."""
    import actors.reward_pool as rp

    original = rp.apply_score
    applied: Counter = Counter()

    def counting_apply(traj, score):
        applied[(traj.question_id, traj.sample_index)] += 1
        return original(traj, score)

    rp.apply_score = counting_apply
    return applied, lambda: setattr(rp, "apply_score", original)


def rejudged(records) -> int:
    """Successful calls whose exact prompt already had a successful reply: work paid twice
    (e.g. a resubmitted chunk)."""
    import json

    seen: Counter = Counter()
    for r in records:
        if r.status == 200 and r.body is not None:
            seen[json.dumps(r.body.get("messages"), sort_keys=True)] += 1
    return sum(c - 1 for c in seen.values() if c > 1)


def perfect_pool_ratio(args, slots: int, calls_per_traj: int, seeds: int = 5) -> float:
    """The throughput_ratio of a pool without any overhead, for this batch: `slots` FIFO slots, each
    trajectory holding one for its calls, failed calls and backoffs included (a simulation with the
    same error rate and backoff policy). It is below 1 - error_rate because the batch ends: the last
    wave leaves slots idle while the last calls (and their retries) finish."""
    import heapq
    import random

    ratios = []
    for seed in range(seeds):
        rng = random.Random(seed)
        free_at = [0.0] * slots
        ok, end = 0, 0.0
        for _ in range(args.trajectories):
            t = heapq.heappop(free_at)
            for _call in range(calls_per_traj):
                for retry in range(args.max_retries + 1):
                    t += args.latency
                    if rng.random() >= args.error_rate:
                        ok += 1
                        break
                    if retry < args.max_retries:
                        t += min(args.backoff_max, args.backoff_base * 2**retry) * (0.5 + 0.5 * rng.random())
            heapq.heappush(free_at, t)
            end = max(end, t)
        ratios.append(ok / end / (slots / args.latency))
    return sum(ratios) / len(ratios)


# --------------------------------------------------------------------------------------------
# The run


async def run_pool(args, srv, cfg) -> dict:
    import ray

    from actors.reward_pool import RewardPool

    calls_per_traj = 2 if args.stage == 2 else 1
    conc = cfg.num_actors * min(cfg.max_in_flight_per_actor, cfg.judge.max_in_flight)
    warm_n = conc if args.warmup is None else args.warmup
    pool = RewardPool.create(cfg, redis_url=None, redis_password=None, namespace="bench-judge-pool")
    try:
        await pool.ready()
        if warm_n > 0:
            wtrajs, wquestions = make_batch(warm_n, "warm", args.stage)
            await pool.score(wtrajs, wquestions)
        stats_before = await pool.stats()

        trajs, questions = make_batch(args.trajectories, "bench", args.stage)
        applied, restore = count_applications()
        first_record = srv.request_count
        kill: dict = {}

        async def killer() -> None:
            target = first_record + max(1, args.trajectories * calls_per_traj // 3)
            while srv.request_count < target:
                await asyncio.sleep(0.01)
            kill["at_s"] = time.perf_counter() - t0
            ray.kill(pool.actors[0], no_restart=False)  # Ray restarts it; its chunks in flight are dealt again

        try:
            with InFlightSampler(srv) as sampler:
                cpu0, procs0 = cpu_times(), process_cpu()
                t0 = time.perf_counter()
                clock_offset = time.monotonic() - t0  # server records use time.monotonic()
                kill_task = asyncio.ensure_future(killer()) if args.kill_actor else None
                report = await score_in_groups(pool, trajs, questions, args.group_size)
                wall = time.perf_counter() - t0
                cpu1, procs1 = cpu_times(), process_cpu()
                if kill_task is not None and not kill_task.done():
                    kill_task.cancel()
        finally:
            restore()
        stats_after = await pool.stats()
    finally:
        await pool.close()

    records = [r for r in srv.requests[first_record:] if r.path == CHAT_PATH]
    spec = cfg.spec()
    wrong = sum(
        1
        for t in trajs
        if t.reward is not None and abs(t.reward - expected_reward(t, questions[t.question_id], spec)) > 1e-9
    )
    return {
        "trajs": trajs,
        "report": report,
        "wall": wall,
        "records": records,
        "applied": applied,
        "kill": kill,
        "sampler_mean": sampler.mean(t0, t0 + wall),
        "sampler_peak": sampler.peak,
        "sampler": sampler,
        "t0": t0,
        "wall_end": t0 + wall,
        "cpu_busy": (cpu1[0] - cpu0[0]) / max(1.0, cpu1[1] - cpu0[1]) if cpu0 and cpu1 else None,
        "cpu_roles": cpu_by_role(procs0, procs1),
        "wrong": wrong,
        "warm_n": warm_n,
        "stats_delta": {
            k: stats_after.get(k, 0) - stats_before.get(k, 0)
            for k in ("coalesced", "cache_hits", "requests", "retries", "latency_sum_s", "latency_count")
        },
        "clock_offset": clock_offset,
        "conc": conc,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.config import RewardsConfig
    from rewards.judge_client import JudgeSettings
    from tests.servers.openai_server import OpenAITestServer

    console = Console(width=max(150, Console().width))
    # A killed actor drops its connections mid-request; the test server's aiohttp then logs a
    # ConnectionResetError traceback per dropped request. Expected, and not the benchmark's output.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    key = "sk-bench-" + secrets.token_hex(16)  # never printed
    judge_mif = args.in_flight_per_actor
    actor_mif = args.in_flight_per_actor + args.queue_per_actor
    conc_per_actor = min(actor_mif, judge_mif)
    conc = args.actors * conc_per_actor
    chunks_per_actor = max(1, actor_mif // args.chunk_size)
    if chunks_per_actor * args.chunk_size < conc_per_actor:
        console.print(
            f"[yellow]note: {chunks_per_actor} chunks x {args.chunk_size} trajectories per actor < {conc_per_actor} "
            "slots: the pool cannot fill the concurrency the ideal assumes[/]"
        )
    ideal = conc / args.latency
    calls_per_traj = 2 if args.stage == 2 else 1

    srv = OpenAITestServer(
        latency_s=args.latency, error_rate=args.error_rate, error_codes=(429, 500), seed=args.seed, api_key=key
    )
    ray_started = False
    try:
        with srv:
            ray.init(
                address="local",
                num_cpus=args.num_cpus or os.cpu_count() or 2,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"RAPO_JUDGE_API_KEY": key, "RAY_DEDUP_LOGS": "1"}},
            )
            ray_started = True
            cfg = RewardsConfig(
                stage=args.stage,
                num_actors=args.actors,
                max_in_flight_per_actor=actor_mif,
                chunk_size=args.chunk_size,
                cache=False,
                judge=JudgeSettings(
                    base_url=srv.base_url,
                    model=srv.model,
                    timeout_s=args.timeout,
                    max_retries=args.max_retries,
                    backoff_base_s=args.backoff_base,
                    backoff_max_s=args.backoff_max,
                    jitter=True,
                    max_in_flight=judge_mif,
                ),
            )
            r = asyncio.run(run_pool(args, srv, cfg))
            server_peak_all = srv.max_in_flight
    finally:
        if ray_started or ray.is_initialized():
            ray.shutdown()

    trajs, report, wall, records = r["trajs"], r["report"], r["wall"], r["records"]
    by_status = Counter(rec.status for rec in records)
    ok = by_status.get(200, 0)
    failed = len(records) - ok
    achieved = ok / wall
    ratio = achieved / ideal
    adj_ideal = ideal * (1 - args.error_rate)
    lost = sum(1 for t in trajs if t.reward is None or r["applied"][(t.question_id, t.sample_index)] == 0)
    twice = sum(1 for c in r["applied"].values() if c > 1)
    duplicated = report.duplicates + twice

    table = Table(
        title=f"judge pool: stage {args.stage}, {args.trajectories} trajectories, {args.latency * 1000:g} ms latency, "
        f"{args.error_rate:.0%} errors" + (", judge-0 killed" if args.kill_actor else "")
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    rows = [
        (
            "actors x slots",
            f"{args.actors} x {conc_per_actor} = {conc}",
            (
                f"C = actors x min(max_in_flight_per_actor {actor_mif}, judge.max_in_flight {judge_mif}); "
                f"chunk_size {args.chunk_size}, {chunks_per_actor} chunks/actor"
            ),
        ),
        ("wall time (pool.score)", f"{wall:.2f} s", f"after {r['warm_n']} warm-up trajectories (untimed)"),
        (
            "HTTP calls served",
            f"{len(records)}",
            f"{ok} ok, {failed} failed ({dict(sorted((k, v) for k, v in by_status.items() if k != 200))})",
        ),
        ("calls needed", f"{args.trajectories * calls_per_traj}", f"{calls_per_traj} per trajectory"),
        (
            "server in flight",
            f"mean {r['sampler_mean']:.1f}, peak {r['sampler_peak']}",
            f"sampled every 5 ms; server max_in_flight {server_peak_all} (whole run)",
        ),
        (
            "host CPU busy",
            "n/a" if r["cpu_busy"] is None else f"{r['cpu_busy']:.0%} of {os.cpu_count()} cores",
            "all processes on the host during pool.score (other workloads included)",
        ),
        (
            "CPU of this benchmark",
            "{:.2f} s".format(sum(r["cpu_roles"].values())),
            (
                "driver (pool + test server thread) {driver:.2f} s, actors {actors:.2f} s, "
                "Ray system {ray:.2f} s; {per:.1f} ms per HTTP call"
            ).format(
                **{k: r["cpu_roles"].get(k, 0.0) for k in ("driver", "actors", "ray")},
                per=1000 * sum(r["cpu_roles"].values()) / max(1, len(records)),
            ),
        ),
        ("achieved (all calls)", f"{len(records) / wall:.1f} /s", "HTTP requests incl. failed ones / wall"),
        ("achieved (successful calls)", f"{achieved:.1f} /s", f"{args.trajectories / wall:.1f} trajectories/s"),
        ("ideal = C / latency", f"{ideal:.1f} /s", f"{conc} / {args.latency:g} s; the ratio uses this"),
        (
            "error-adjusted ideal",
            f"{adj_ideal:.1f} /s",
            f"ideal x (1 - {args.error_rate:g}): failed calls hold a slot too",
        ),
        (
            "throughput_ratio",
            f"{ratio:.3f}",
            f"achieved ok / ideal; vs error-adjusted ideal: {achieved / adj_ideal:.2f}",
        ),
        (
            "perfect-pool ratio",
            f"{perfect_pool_ratio(args, conc, calls_per_traj):.2f}",
            "simulated: the same batch, errors and backoff on C slots with zero overhead (the finite batch's tail)",
        ),
        (
            "retries / fallbacks",
            f"{report.retries} / {report.fallbacks}",
            "from the PoolReport of the delivered scores",
        ),
        (
            "coalesced / cache hits",
            f"{r['stats_delta']['coalesced']:g} / {r['stats_delta']['cache_hits']:g}",
            "must be 0: every case is unique, cache off",
        ),
        (
            "actor failures / resubmitted",
            f"{report.actor_failures} / {report.resubmitted}",
            f"judge-0 killed at {r['kill']['at_s']:.2f} s"
            if r["kill"]
            else "judge-0 not killed: the run ended first"
            if args.kill_actor
            else "no kill",
        ),
        (
            "re-judged (paid twice)",
            f"{rejudged(records)}",
            "successful calls on a prompt already answered (resubmitted chunks)",
        ),
        ("rewards delivered", f"{report.scores}", f"of {args.trajectories}"),
        ("rewards off the rule value", f"{r['wrong']}", "the test server judges by the rules, as does the fallback"),
        ("lost", f"{lost}", "trajectories without a reward"),
        ("duplicated", f"{duplicated}", f"{report.duplicates} dropped as arriving twice + {twice} applied twice"),
    ]
    loss = capacity_loss(r, args.latency)
    mid0, mid1 = loss.middle_window
    steady = loss.middle_ok / (mid1 - mid0) / ideal if mid1 > mid0 else 0.0
    perfect = perfect_pool_ratio(args, conc, calls_per_traj)
    rows += [
        (
            "steady-state ratio",
            f"{steady:.3f}",
            f"ok calls ending in [{mid0 - r['t0']:.2f}, {mid1 - r['t0']:.2f}] s / its length / ideal: "
            f"while the pool had new work to start (no ramp, no batch tail); "
            f"vs error-adjusted ideal: {steady / (1 - args.error_rate):.2f}",
        ),
        (
            "pool efficiency",
            f"{ratio / perfect:.2f}",
            "throughput_ratio / perfect-pool ratio: this pool vs a zero-overhead one",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if args.timeline:
        print_capacity_loss(console, loss, conc)
        edges = [r["t0"] + 0.1 * i for i in range(int(wall / 0.1) + 2)]
        means = [r["sampler"].mean(a, min(b, r["wall_end"])) for a, b in itertools.pairwise(edges) if a < r["wall_end"]]
        console.print("in flight per 100 ms: " + " ".join(f"{m:.0f}" for m in means))
    target_met = round(steady / (1 - args.error_rate), 2) >= 0.95 and lost == 0 and duplicated == 0  # as printed
    console.print(
        f"target (steady state >= 0.95 of the error-adjusted ideal, lost = 0, duplicated = 0): "
        f"{'met' if target_met else 'NOT met'}"
    )
    print(
        f"throughput_ratio={ratio:.2f} lost={lost} duplicated={duplicated} steady_ratio={steady:.2f} "
        f"perfect_ratio={perfect:.2f}",
        flush=True,
    )
    return 1 if lost or duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
