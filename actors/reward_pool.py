"""The reward-labeller pool: M async actors that judge answers and label tool calls.

The pool deals trajectories out in small chunks, keeps a bounded number of chunks in flight
per actor, and collects one Score per trajectory. An actor that dies is restarted by Ray
(max_restarts) and its unfinished chunks are dealt out again; a result that arrives twice
is dropped and counted, so every trajectory gets exactly one reward.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter, deque

import ray

from cluster import ray_metrics
from rewards.report import PoolReport
from rewards.scoring import RewardSpec, Score, apply_score, failed_score, score_or_fail
from rollout.types import Question, Trajectory, describe_error


def slim(traj: Trajectory) -> Trajectory:
    """What the judge needs: answer, format, tool calls; not the token arrays."""
    # A shallow copy, not dataclasses.replace (which re-runs __init__ over every field): the judge
    # only reads, and the controller slims every episode.
    out = copy.copy(traj)
    out.token_ids, out.loss_mask, out.behaviour_logprobs = [], [], []
    return out


@ray.remote
class RewardLabeller:
    def __init__(self, name: str, spec: RewardSpec, judge_settings, llm_labels: bool, redis_url: str | None,
                 redis_password: str | None, namespace: str, max_in_flight: int):
        self.name = name
        self.spec = spec
        self.settings = judge_settings
        self.llm_labels = llm_labels
        self.redis_url, self.redis_password, self.namespace = redis_url, redis_password, namespace
        self.max_in_flight = max_in_flight
        self.judge = None
        self.gate: asyncio.Semaphore | None = None
        self.scored = 0
        self.failures_seen: dict[str, int] = {}  # judge failures by reason already on the metrics

    async def _ready(self) -> None:
        # Clients bind to the running event loop, so they are made in it, on first use.
        if self.gate is not None:
            return
        self.gate = asyncio.Semaphore(self.max_in_flight)
        if self.settings is not None:
            from actors.redis_client import async_client
            from rewards.judge_client import JudgeClient, RedisJudgeCache

            cache = None
            if self.redis_url:
                cache = RedisJudgeCache(async_client(self.redis_url, self.redis_password), self.namespace)
            self.judge = JudgeClient(self.settings, cache=cache)

    async def score(self, items: list[tuple[int, Trajectory, Question]]) -> list[tuple[int, Score]]:
        await self._ready()

        async def one(key: int, traj: Trajectory, question: Question) -> tuple[int, Score]:
            async with self.gate:
                # score_or_fail: a judging error fails this trajectory only, not the chunk.
                return key, await score_or_fail(traj, question, self.spec, self.judge, self.llm_labels)

        results = await asyncio.gather(*(one(*item) for item in items))
        self.scored += len(results)
        # Dashboard: recorded here, in the process that judges (rapo_judge_latency_seconds, rapo_judge_errors_total).
        failures = (
            ray_metrics.new_counts(self.judge.stats.failures, self.failures_seen) if self.judge is not None else {}
        )
        ray_metrics.record_judge([score.latency_s for _, score in results], failures)
        return list(results)

    async def stats(self) -> dict[str, float]:
        out = {"scored": float(self.scored)}
        if self.judge is not None:
            out.update(self.judge.stats.as_dict())
        return out

    def ping(self) -> str:
        return self.name

    def info(self) -> dict:
        import os

        return {
            "name": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "scored": self.scored,
        }

    async def close(self) -> None:
        if self.judge is not None:
            await self.judge.close()


class RewardPool:
    def __init__(
        self, actors: list, *, chunk_size: int = 4, chunks_in_flight_per_actor: int = 4, max_attempts: int = 5
    ):
        self.actors = actors
        self.chunk_size = chunk_size
        self.per_actor = chunks_in_flight_per_actor
        self.max_attempts = max_attempts
        # Chunks in flight per actor over every score() call at once: the controller scores each group
        # with its own call, so a per-call count would deal every group's first chunks to the same
        # first actors and leave the rest idle.
        self.load = [0] * len(actors)
        self._freed: asyncio.Event | None = None  # set (and replaced) whenever a chunk comes back
        self._freed_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def create(cls, cfg, *, redis_url: str | None, redis_password: str | None, namespace: str) -> RewardPool:
        """``cfg`` is the RewardsConfig section."""
        spec = cfg.spec()
        actors = [
            RewardLabeller.options(
                name=f"judge-{i}",
                num_cpus=cfg.num_cpus_per_actor,
                resources=dict(cfg.resources) or None,
                max_restarts=-1,
                max_task_retries=0,
            ).remote(
                f"judge-{i}",
                spec,
                cfg.judge,
                cfg.uses_llm_labels(),
                redis_url if cfg.cache else None,
                redis_password,
                namespace,
                cfg.max_in_flight_per_actor,
            )
            for i in range(cfg.num_actors)
        ]
        return cls(
            actors,
            chunk_size=cfg.chunk_size,
            chunks_in_flight_per_actor=max(1, cfg.max_in_flight_per_actor // cfg.chunk_size),
        )

    async def ready(self) -> list[str]:
        return list(await asyncio.gather(*(a.ping.remote() for a in self.actors)))

    async def describe(self) -> list[dict]:
        infos = await asyncio.gather(*(a.info.remote() for a in self.actors), return_exceptions=True)
        return [
            i if isinstance(i, dict) else {"name": f"judge-{n}", "error": type(i).__name__} for n, i in enumerate(infos)
        ]

    async def score(self, trajs: list[Trajectory], questions: dict[str, Question]) -> PoolReport:
        """Sets reward, correct and labels on every trajectory (in place)."""
        report = PoolReport()
        chunks = deque()
        for start in range(0, len(trajs), self.chunk_size):
            keys = range(start, min(start + self.chunk_size, len(trajs)))
            chunks.append(([(k, slim(trajs[k]), questions[trajs[k].question_id]) for k in keys], 0))
        results: dict[int, Score] = {}
        running: dict[asyncio.Future, tuple[int, list, int]] = {}
        probes: dict[asyncio.Future, int] = {}
        load = self.load
        down: set[int] = set()
        freed: asyncio.Future | None = None
        try:
            while chunks or running:
                up = [i for i in range(len(self.actors)) if i not in down]
                while chunks and up and min(load[i] for i in up) < self.per_actor:
                    actor = min(up, key=lambda i: load[i])
                    items, tries = chunks.popleft()
                    future = asyncio.ensure_future(self.actors[actor].score.remote(items))
                    running[future] = (actor, items, tries)
                    load[actor] += 1
                if chunks and up and freed is None:
                    # Every live actor is full with other calls' chunks: wake when any comes back.
                    freed = asyncio.ensure_future(self._freed_event().wait())
                waiting = [*running, *probes, *([freed] if freed is not None else [])]
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    if future is freed:
                        freed = None
                        continue
                    if future in probes:
                        actor = probes.pop(future)
                        if future.exception() is None:
                            down.discard(actor)  # restarted by Ray: back in rotation
                        else:
                            probes[asyncio.ensure_future(self._probe(actor))] = actor
                        continue
                    actor, items, tries = running.pop(future)
                    self._release(actor)
                    try:
                        scored = future.result()
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                        report.actor_failures += 1
                        ray_metrics.record_judge(errors={"actor_failure": 1})
                        if tries + 1 >= self.max_attempts:
                            raise RuntimeError(
                                f"judge-{actor} failed {self.max_attempts} times scoring a chunk: {e}"
                            ) from e
                        report.resubmitted += len(items)
                        # First in line for a live actor; the dead one is probed until Ray has restarted it.
                        chunks.appendleft((items, tries + 1))
                        if actor not in down:
                            down.add(actor)
                            probes[asyncio.ensure_future(self._probe(actor))] = actor
                        continue
                    except Exception as e:  # noqa: BLE001 - the chunk's task failed, its actor lives on
                        report.chunk_errors += 1
                        scored = [(key, failed_score(describe_error(e), "error")) for key, _, _ in items]
                    for key, score in scored:
                        if key in results:
                            report.duplicates += 1
                            continue
                        results[key] = score
                if chunks and not running and len(down) == len(self.actors) and not probes:
                    for actor in down:
                        probes[asyncio.ensure_future(self._probe(actor))] = actor
        finally:
            for probe in probes:
                probe.cancel()
            if freed is not None:
                freed.cancel()
            for actor, _, _ in running.values():
                self._release(actor)  # cancelled or failed mid-call: its chunks no longer count
        for key, score in results.items():
            apply_score(trajs[key], score)
            report.add(score)
        return report

    def _freed_event(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._freed is None or self._freed_loop is not loop:  # an event serves one loop
            self._freed, self._freed_loop = asyncio.Event(), loop
        return self._freed

    def _release(self, actor: int) -> None:
        self.load[actor] -= 1
        if self._freed is not None:
            self._freed.set()  # wakes every call waiting for room; the next waiter gets a fresh event
            self._freed = None

    async def _probe(self, actor: int, delay_s: float = 0.2) -> str:
        await asyncio.sleep(delay_s)
        return await self.actors[actor].ping.remote()

    async def stats(self) -> dict[str, float]:
        """Judge client counters summed over the actors (an actor restart starts its counters anew)."""
        total: Counter = Counter()
        for s in await asyncio.gather(*(a.stats.remote() for a in self.actors), return_exceptions=True):
            if isinstance(s, dict):
                total.update(s)
        return dict(total)

    async def close(self) -> None:
        await asyncio.gather(*(a.close.remote() for a in self.actors), return_exceptions=True)
        for a in self.actors:
            ray.kill(a)
