"""The controller: wires the rollout fleet, the reward pool, the group stream and the learner group.

It runs as a named, detached Ray actor ("controller") pinned to the driver's node. Two loops
share one event loop:

- the producer admits groups (a question's n episodes) while the staleness bound allows,
  runs each on the fleet, scores it, applies RAPO's pruning/replay bookkeeping and appends
  it to the Redis stream;
- the trainer reads B groups from the stream, drops (or down-weights) over-stale ones,
  trains, publishes the new weights to every worker (in flight), checkpoints, and only
  then acknowledges the stream entries it used.

Sync mode is the same graph with a staleness bound of 0: a batch is admitted only after the
previous step finished. Every admitted group ends trained, dropped and re-run, or left over
at the end; `lost_episodes` in the summary checks that bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.learner_group import LearnerGroup
from actors.redis_client import async_client
from actors.reward_pool import RewardPool
from actors.rollout_fleet import RolloutFleet, WorkerLost, rollout_worker_factory
from actors.weight_sync import WeightBroadcaster
from cluster import ray_metrics
from cluster.admission import Admission, StalenessPolicy
from cluster.config import RunConfig, flatten
from cluster.data import RunData, load_run_data
from cluster.engines import engine_spec, episode_limits, eval_requests, eval_row, rollout_dtype
from cluster.run_metrics import (
    idle_fractions,
    judge_metrics,
    judge_tally,
    rapo_step_metrics,
    reduce_learner,
    run_summary,
    staleness_metrics,
    step_metrics,
    trajectory_metrics,
)
from cluster.run_state import PendingGroup, RunState, checkpoint_tags, latest_tag, load_latest
from cluster.tracking import Tracker, plot_curves
from learner.batch import plan_step
from learner.group_stream import GroupStream
from learner.groups import ScoredGroup, batch_samples, inject_replays
from learner.pruning import PruningState
from learner.replay_buffer import ReplayBuffer
from learner.scheduler import PromptScheduler
from rollout.engine_factory import resolve_engine_kind
from rollout.episodes import EpisodeRequest, episode_seed
from rollout.types import Question, describe_error
from rollout.weights import BroadcastRef

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the driver decided before the cluster starts: where things are, which ids."""

    run_id: str
    output_dir: str
    model_dir: str
    redis_url: str
    redis_password: str | None
    namespace: str
    tracking_uri: str
    weights_dir: str
    model_meta: dict = field(default_factory=dict)
    # A checkpoint folder to continue from (``rapo run --resume``).
    resume_from: str | None = None


# The summary keeps the first errors; a question that fails every time should not fill it.
MAX_ERRORS_KEPT = 100


class GroupFailed(RuntimeError):
    """Every episode of a group failed: nothing in it to train on."""


class LearnerFailed(RuntimeError):
    pass


class LearnerTimedOut(LearnerFailed):
    """A learner call ran past learner.timeout_s. A step that slow is most likely a rank stuck in a
    collective, which no dead actor reports: the learner is restarted like a dead rank (bounded)."""


# What the trainer answers by restarting the learner group from the last checkpoint (at most 5 times).
RESTARTS_LEARNER = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LearnerFailed)


async def within_learner_timeout(call, timeout_s: float, what: str):
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError as e:
        raise LearnerTimedOut(f"{what} took longer than learner.timeout_s ({timeout_s:g} s); "
                              "raise learner.timeout_s if steps are this slow") from e


class Controller:
    def __init__(self, cfg: RunConfig, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx
        self.output_dir = Path(ctx.output_dir)
        p, lc = cfg.pipeline, cfg.learner
        self.phase = "starting"
        self.stop_requested = False  # `rapo stop`: the step in progress is the last
        self.finishing = False  # the last step is done: final eval, checkpoint, export
        self.state = RunState()  # what a checkpoint holds
        self.tracker: Tracker | None = None
        self.engine_kind = resolve_engine_kind(cfg.rollout.engine)
        self.rollout_dtype = rollout_dtype(cfg.rollout)  # the dtype weights are published in
        self.weight_transport = cfg.weights.resolve(self.engine_kind, cfg.learner.backend,
                                                    cfg.learner.num_gpus_per_rank, cfg.rollout.num_gpus_per_worker)
        self.started = time.time()
        self.errors: list[str] = []
        self.use_scaling, self.use_replay, self.use_pruning = (
            lc.feature("adv_scaling"), lc.feature("replay"), lc.feature("pruning"))
        # Made in start(): the data, the Redis-backed parts, the actors.
        self.data: RunData | None = None
        self.questions: dict[str, Question] = {}
        self.redis = None
        self.stream: GroupStream | None = None
        self.replay: ReplayBuffer | None = None
        self.pruning: PruningState | None = None
        self.scheduler: PromptScheduler | None = None
        self.fleet: RolloutFleet | None = None
        self.rewards: RewardPool | None = None
        self.learner: LearnerGroup | None = None
        self.learner_info: list[dict] = []
        self.worker_info: list[dict] = []
        # Pipeline bookkeeping that is not checkpointed (a checkpoint records the groups in flight).
        self.admission = Admission(p.questions_per_step, p.staleness_bound, total_steps=p.steps)
        self.staleness = StalenessPolicy(p.staleness_bound, p.stale_action, p.stale_weight, self.state.staleness)
        self.requeue: deque[PendingGroup] = deque()
        self.running: dict[str, PendingGroup] = {}
        self.pruned_questions: set[str] = set()
        self.unacked: list[str] = []
        self.replay_cursor: str | None = None  # read pending stream entries first (after a restart)
        self.trained = asyncio.Event()
        self.group_tasks: set[asyncio.Task] = set()
        self.judge_tally: Counter = Counter()
        self.learner_busy_s = 0.0
        self.pipeline_started: float | None = None
        self.fleet_busy_at_start: dict[str, float] = {}

    # ---- set-up -------------------------------------------------------------------------
    async def start(self) -> dict:
        cfg = self.cfg
        self.data = load_run_data(cfg)
        self.questions = self.data.by_id()
        self.redis = async_client(self.ctx.redis_url, self.ctx.redis_password)
        await self.redis.ping()
        ns = self.ctx.namespace
        self.stream = GroupStream(self.redis, ns)
        await self.stream.ensure()
        self.replay = ReplayBuffer(self.redis, ns, threshold=cfg.learner.replay_threshold,
                                   max_entries=cfg.learner.replay_max_entries)
        self.pruning = PruningState(self.redis, ns, threshold=cfg.learner.prune_threshold)
        resumed_tag = self._load_run_state() if self.ctx.resume_from else None
        self.scheduler = PromptScheduler([q.id for q in self.data.train], cfg.pipeline.seed, self.state.scheduler)
        # The pruned set lives in Redis: a resumed (or restarted) run skips what was pruned before.
        self.pruned_questions = await self.pruning.pruned() if self.use_pruning else set()
        self.scheduler.prune(self.pruned_questions)

        self.phase = "starting actors"
        documents = ray.put(self.data.documents)
        self.fleet = RolloutFleet(self._worker_factory(documents), groups_per_worker=self._groups_per_worker(),
                                  weight_sync_timeout_s=cfg.pipeline.weight_sync_timeout_s,
                                  broadcaster=self._weight_broadcaster())
        self.rewards = RewardPool.create(cfg.rewards, redis_url=self.ctx.redis_url,
                                         redis_password=self.ctx.redis_password, namespace=ns)
        self.learner = self._new_learner()
        results = await asyncio.gather(
            self.learner.setup(self.ctx.model_dir, cfg.micro_batches_per_rank, cfg.rollout.temperature),
            self.rewards.ready(), self.fleet.start(cfg.rollout.num_workers),
        )
        self.learner_info, self.worker_info = results[0], results[2]
        log.info("learner precision: %s (%s)", self.learner_info[0].get("precision"),
                 self.learner_info[0].get("precision_reason"))
        if resumed_tag:
            self.phase = "restoring checkpoint"
            await self.learner.load_checkpoint(str(self.output_dir / "checkpoints"), resumed_tag)
            await self._restore_pipeline()
            # The new workers get the checkpoint's weights under the checkpoint's version, so groups
            # it left in the stream stay as fresh as they were (their lag is what the uninterrupted
            # run would see); groups from later, lost versions have a negative lag and are re-run.
            await self._publish_weights()
        self.tracker = Tracker(self.ctx.tracking_uri, cfg.tracking.experiment, self.output_dir)
        self.state.mlflow_run_id = self.tracker.start(
            cfg.tracking.run_name or self.ctx.run_id, {**flatten(cfg), **self._precision()},
            tags={"rapo.run_id": self.ctx.run_id, "rapo.engine": self.engine_kind, "rapo.mode": cfg.pipeline.mode,
                  "rapo.weights": self.weight_transport,
                  "rapo.algorithm": cfg.learner.algorithm},
            resume_run_id=self.state.mlflow_run_id,
        )
        await self._write_actor_table()
        return {"mlflow_run_id": self.state.mlflow_run_id, "workers": self.worker_info, "learners": self.learner_info,
                "resumed_at_step": self.state.step if resumed_tag else None}

    def _precision(self) -> dict[str, str]:
        """The compute precision chosen for the learner and the warm start (from the CPU's bf16 support)."""
        return {"precision.learner": self.learner_info[0].get("precision", "") if self.learner_info else "",
                "precision.warm_start": self.ctx.model_meta.get("precision", "")}

    def _groups_per_worker(self) -> int:
        p, r = self.cfg.pipeline, self.cfg.rollout
        return p.groups_per_worker or max(1, r.max_concurrent_episodes // p.samples_per_question)

    def _worker_factory(self, documents):
        cfg, r = self.cfg, self.cfg.rollout
        spec = engine_spec(cfg, Path(self.ctx.model_dir), self.engine_kind, self.weight_transport)
        limits = episode_limits(r)
        options = {"num_cpus": r.num_cpus_per_worker, "num_gpus": r.num_gpus_per_worker,
                   "resources": dict(r.resources) or None}
        redis = (self.ctx.redis_url, self.ctx.redis_password, self.ctx.namespace)
        return rollout_worker_factory(
            options, (self.engine_kind, spec, limits, cfg.tools, documents, self.ctx.weights_dir, redis))

    def _weight_broadcaster(self) -> WeightBroadcaster | None:
        """weights.transport gloo / nccl: versions go through vLLM's weight-transfer protocol (None: files)."""
        if self.weight_transport == "file":
            return None
        gpu = self.cfg.learner.num_gpus_per_rank > 0
        return WeightBroadcaster(lambda: self.learner, transport=self.weight_transport, dtype=self.rollout_dtype,
                                 bucket_bytes=self.cfg.weights.bucket_bytes(gpu),
                                 timeout_s=self.cfg.pipeline.weight_sync_timeout_s,
                                 local_shm=self.cfg.weights.local_shm)

    def _weights_lock(self):
        """Held from a train step to its push, so a worker catching up always gets a published version."""
        broadcaster = self.fleet.broadcaster if self.fleet is not None else None
        return broadcaster.lock if broadcaster is not None else contextlib.nullcontext()

    def _new_learner(self) -> LearnerGroup:
        lc = self.cfg.learner
        return LearnerGroup(lc, num_cpus=lc.num_cpus_per_rank, num_gpus=lc.num_gpus_per_rank)

    # ---- the run ----------------------------------------------------------------------------
    async def run(self) -> dict:
        cfg = self.cfg
        try:
            if not self.state.evals and cfg.pipeline.eval_at_start:
                self.phase = "evaluating (initial)"
                await self._evaluate(0)
            if self.state.step < cfg.pipeline.steps:
                await self._pipeline()
            self.finishing = True
            if not self.state.evals or self.state.evals[-1]["step"] != self.state.step:
                self.phase = "evaluating (final)"
                await self._evaluate(self.state.step)
            await self._checkpoint(self.state.step)
            await self._export_policy()
            stopped = self.stop_requested and self.state.step < cfg.pipeline.steps
            summary = await self._summary("stopped" if stopped else "completed")
            self._finish(summary, "FINISHED")
            return summary
        except BaseException as e:
            # The first lines say what happened; a whole remote traceback would drown the summary.
            self.errors.append(f"{type(e).__name__}: {str(e)[:2000]}")
            summary = await self._summary("failed")
            self._finish(summary, "FAILED")
            raise

    async def _pipeline(self) -> None:
        self.pipeline_started = time.monotonic()
        self.learner_busy_s = 0.0
        self.fleet_busy_at_start = self.fleet.busy_seconds()
        producer = asyncio.ensure_future(self._producer())
        try:
            await self._trainer()
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            tasks = list(self.group_tasks)
            # Groups still running are left over: let them finish so their episodes are accounted for.
            if tasks:
                self.phase = "finishing in-flight groups"
                done, pending = await asyncio.wait(tasks, timeout=300)
                for t in pending:
                    t.cancel()

    # ---- producer ------------------------------------------------------------------------------
    async def _producer(self) -> None:
        while True:
            await self._wait_for_room()
            group = self.requeue.popleft() if self.requeue else self._draw()
            self._start_group(group)
            await asyncio.sleep(0)

    async def _wait_for_room(self) -> None:
        """Until the staleness bound admits another group and a worker has a free slot."""
        while not (self.admission.can_admit(self.state.step) and await self.fleet.has_capacity()):
            self.trained.clear()
            # Woken by a finished step, or a free worker slot (polled: scaling changes capacity).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.trained.wait(), 0.25)

    def _start_group(self, group: PendingGroup) -> None:
        self.admission.admit()
        self.running[group.group_id] = group
        task = asyncio.ensure_future(self._run_group(group))
        self.group_tasks.add(task)
        task.add_done_callback(self.group_tasks.discard)

    def _draw(self) -> PendingGroup:
        draw = self.scheduler.next_batch(1)
        qid = draw.ids[0]
        epoch = draw.epochs[qid]
        self.state.last_epoch_drawn = max(self.state.last_epoch_drawn, epoch)
        self.state.group_counter += 1
        self.state.counts["admitted"] += 1
        group_id = f"g{self.state.group_counter}"
        if self.use_pruning:
            self.state.pruning_epochs.drawn(epoch, group_id, draw.ended)
        return PendingGroup(group_id, qid, epoch)

    async def _run_group(self, group: PendingGroup) -> None:
        """One group's error boundary: a group that raises, or whose episodes all failed, is run again
        up to pipeline.max_group_reruns times, then dropped and counted; other groups go on."""
        try:
            scored = await self._play_and_score(group)
            failed = [m for m in scored.members if m.error]
            self.state.counts["failed_episodes"] += len(failed)
            if failed and len(failed) == len(scored.members):
                raise GroupFailed(
                    f"all {len(failed)} episodes of question {group.question_id} failed: {failed[0].error}"
                )
            await self._assemble_and_publish(scored)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._group_failed(group, e)
            return
        self.running.pop(group.group_id, None)
        self.admission.finish()

    def _group_failed(self, group: PendingGroup, error: Exception) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"group {group.group_id} ({group.question_id}): {describe_error(error)}")
        if isinstance(error, GroupFailed):
            log.warning("group %s failed: %s", group.group_id, error)
        else:
            log.exception("group %s failed", group.group_id)
        self.admission.abandon()
        self.running.pop(group.group_id, None)
        self.state.counts["failed_attempts"] += 1
        if group.failures < self.cfg.pipeline.max_group_reruns:
            self.requeue.append(replace(group, failures=group.failures + 1))
            return
        # Dropped: counted, and its epoch no longer waits for it before pruning.
        self.state.counts["failed_groups"] += 1
        # (Settled by draw: a group dropped after it was already scored once is not counted out twice.)
        self.state.pruning_epochs.settle(group.epoch, group.group_id)

    async def _play_and_score(self, group: PendingGroup) -> ScoredGroup:
        """The group's episodes on the fleet (run again elsewhere if its worker dies), then judged."""
        cfg, p = self.cfg, self.cfg.pipeline
        q = self.questions[group.question_id]
        requests = [
            EpisodeRequest(q, i, cfg.rollout.temperature, cfg.rollout.top_p,
                           episode_seed(p.seed, group.group_id, q.id, i))
            for i in range(p.samples_per_question)
        ]
        t0 = time.perf_counter()
        while True:
            try:
                trajs = await self.fleet.run_group(requests, group.group_id)
                break
            except WorkerLost:
                # Its worker died mid-episode: run the whole group again elsewhere.
                self.state.counts["reruns"] += 1
        t1 = time.perf_counter()
        report = await self.rewards.score(trajs, self.questions)
        self.judge_tally.update(judge_tally(report))
        return ScoredGroup(
            q.id, sorted(trajs, key=lambda t: t.sample_index), group.group_id, group.epoch,
            generate_s=t1 - t0, reward_s=time.perf_counter() - t1,
        )

    async def _assemble_and_publish(self, group: ScoredGroup) -> None:
        """RAPO bookkeeping on a scored group, then the group onto the stream for the learner.

        Pruning counts use the fresh rollouts; replay stores this group's newest success and,
        if every member failed, injects the question's stored success into the group. The replay
        store and counter go in the publish transaction: one round trip for the group and its replay.
        """
        if self.use_pruning:
            await self._record_pruning(group)
        along, injected = await self._replay(group) if self.use_replay else ([], 0)
        await self.stream.publish(group, along)
        self.state.replay_injections += injected

    async def _record_pruning(self, group: ScoredGroup) -> None:
        """Counts once per draw: a re-run (staleness drop) or a retry (a failure after this) adds nothing."""
        ledger = self.state.pruning_epochs
        outcomes = [(m.question_id, bool(m.correct)) for m in group.members]
        await self.pruning.record(group.epoch, group.group_id, outcomes)
        ledger.settle(group.epoch, group.group_id)
        for epoch in ledger.closable():
            # A small pool keeps at least one step's worth of questions.
            keep = self.cfg.pipeline.questions_per_step
            newly = await self.pruning.finish_epoch(epoch, max_prune=self.scheduler.active - keep)
            self.state.pruned_at.update(dict.fromkeys(newly, epoch))
            self.pruned_questions |= newly
            self.scheduler.prune(newly)
            ledger.closed(epoch)

    async def _replay(self, group: ScoredGroup) -> tuple[list[Callable[[Any], object]], int]:
        """Injects a stored success into an all-fail group; returns what to queue on the group's publish
        transaction (the newest fresh success stored, the injection counted) and the injections."""
        fresh = [m for m in group.members if self.replay.eligible(m)]
        stored = [None]
        if group.all_failed:
            stored = await self.replay.get_many([group.question_id])
        rng = np.random.default_rng([self.cfg.pipeline.seed, zlib.crc32(group.group_id.encode()), 7])
        injected = sum(i is not None for i in inject_replays([group], stored, rng))
        along = [lambda pipe: self.replay.count_injected_in(pipe, injected)] if injected else []
        if fresh:
            along.append(lambda pipe: self.replay.put_in(pipe, fresh[-1]))
        return along, injected

    # ---- trainer -------------------------------------------------------------------------------
    async def _trainer(self) -> None:
        cfg = self.cfg
        while self.state.step < cfg.pipeline.steps and not self.stop_requested:
            step = self.state.step + 1
            t_step = time.perf_counter()
            self.phase = f"step {step}: waiting for {cfg.pipeline.questions_per_step} groups"
            entries = await self._take_batch()
            t_wait = time.perf_counter() - t_step
            try:
                train, t_train, t_sync = await self._train_and_publish(entries, step)
            except RESTARTS_LEARNER as e:
                await self._restart_learner(e)
                continue
            self.trained.set()
            self.learner_busy_s += t_train + t_sync
            timings = {"wait_s": t_wait, "train_s": t_train, "weight_sync_s": t_sync,
                       "step_s": time.perf_counter() - t_step}
            await self._log_step(step, [g for _, g in entries], train, timings)
            if cfg.pipeline.eval_every and step % cfg.pipeline.eval_every == 0:
                self.phase = f"step {step}: evaluating"
                await self._evaluate(step)
            # Last, so that the checkpoint holds the step's metrics and eval: a run resumed from it
            # would otherwise lack them (the run's final checkpoint comes after its final eval).
            every = cfg.learner.checkpoint_every
            if every and step % every == 0 and step != cfg.pipeline.steps:
                try:
                    await self._checkpoint(step)
                except RESTARTS_LEARNER as e:
                    await self._restart_learner(e)

    async def _train_and_publish(self, entries: list[tuple[str, ScoredGroup]], step: int) -> tuple[dict, float, float]:
        """One RAPO step on the batch and the new weights to every worker. Returns the learner's numbers
        and the training and weight-sync times."""
        cfg = self.cfg
        self.phase = f"step {step}: training"
        async with self._weights_lock():
            t0 = time.perf_counter()
            train = await self._train(entries, step)
            t_train = time.perf_counter() - t0
            self.phase = f"step {step}: syncing weights"
            self.state.version += 1
            t_sync = await self._publish_weights()
        # Only now may the next groups start: under the staleness bound, with the new weights.
        self.state.step = step
        self.unacked += [eid for eid, _ in entries]
        if not cfg.learner.checkpoint_every:
            # No checkpoints to roll back to: nothing would ever re-read these entries.
            await self._ack()
        return train, t_train, t_sync

    async def _log_step(self, step: int, groups: list[ScoredGroup], train: dict, timings: dict[str, float]) -> None:
        metrics = step_metrics(step, self.state.version, groups, train, timings)
        metrics.update(rapo_step_metrics(
            np.stack([g.rewards for g in groups]), np.array([[m.replayed for m in g.members] for g in groups]),
            scaling=self.use_scaling, pruned_at=self.state.pruned_at, last_epoch_drawn=self.state.last_epoch_drawn,
            replay_lags=[self.state.version - 1 - m.policy_version_start for g in groups for m in g.members
                         if m.replayed],
        ))
        metrics.update(self._pipeline_metrics())
        metrics.update(await self._judge_metrics())
        metrics["queue/groups_depth"] = await self.stream.depth()
        self.state.history.append(metrics)
        self.tracker.log_metrics(metrics, step)
        # Dashboard (Ray's metrics endpoint): this step; a group's staleness is counted at the version it trained at.
        episodes = sum(len(g.members) for g in groups)
        lags = [self.state.version - 1 - g.version_start for g in groups]
        ray_metrics.record_step(metrics, episodes=episodes, lags=lags)
        await self._write_actor_table()

    async def _take_batch(self) -> list[tuple[str, ScoredGroup]]:
        """B groups fresh enough to train on: re-read (after a restart) ones first, then new ones."""
        want = self.cfg.pipeline.questions_per_step
        batch: list[tuple[str, ScoredGroup]] = []
        while len(batch) < want:
            if self.replay_cursor is not None:
                got = await self.stream.pending(want - len(batch), after=self.replay_cursor)
                if got:
                    self.replay_cursor = got[-1][0]
                else:
                    self.replay_cursor = None
                    continue
            else:
                got = await self.stream.read(want - len(batch), block_ms=200)
                if not got:
                    continue
            for eid, group in got:
                if await self._admit_to_batch(eid, group):
                    batch.append((eid, group))
        # Completion order varies from run to run; the batch a step trains on should not.
        return sorted(batch, key=lambda e: (len(e[1].group_id), e[1].group_id))

    async def _admit_to_batch(self, eid: str, group: ScoredGroup) -> bool:
        """Whether a group read from the stream is trained on: a duplicate is acknowledged and skipped,
        an over-stale one dropped and re-run (or down-weighted, by the stale action)."""
        counts = self.state.counts
        if group.group_id and group.group_id in self.state.trained_group_ids:
            # Appended twice (a publish retried across a Redis restart): train it once.
            counts["duplicates"] += 1
            await self.stream.ack([eid])
            return False
        weight = self.staleness.weight(self.state.version - group.version_start)
        if weight == 0.0:
            counts["dropped"] += 1
            self.admission.drop()
            self.requeue.append(PendingGroup(group.group_id + "r", group.question_id, group.epoch))
            await self.stream.ack([eid])
            return False
        if weight != 1.0:
            counts["downweighted"] += 1
            group.weight = weight
        return True

    async def _train(self, entries: list[tuple[str, ScoredGroup]], step: int) -> dict[str, float]:
        cfg = self.cfg
        groups = [g for _, g in entries]
        samples, scale, n_good = batch_samples(
            groups, std=cfg.learner.adv_std, eps=cfg.learner.adv_eps, scale=self.use_scaling,
            version=self.state.version, replay_on_policy=cfg.learner.replay_on_policy,
        )
        plans = plan_step(
            samples, cfg.learner.num_ranks, cfg.learner.mini_batches, seed=cfg.pipeline.seed * 100003 + step,
            max_tokens=cfg.learner.max_tokens_per_micro_batch,
        )
        sums = reduce_learner(await within_learner_timeout(self.learner.train_step(plans), cfg.learner.timeout_s,
                                                           f"training step {step}"))
        for g in groups:
            if g.group_id:
                self.state.trained_group_ids.add(g.group_id)
        self.state.counts["trained"] += len(groups)
        out = {f"learner/{k}": v for k, v in sums.items()}
        out.update({
            "advantage/scale": scale, "advantage/good_groups": n_good, "advantage/groups": len(groups),
            "train/replayed_samples": sum(s.replayed for s in samples),
        })
        return out

    async def _publish_weights(self) -> float:
        """The time/weight_sync_s (and ray_rapo_weight_sync_seconds) of a step: the whole push."""
        t0 = time.perf_counter()
        if self.fleet.broadcaster is not None:
            await self.fleet.sync_weights(BroadcastRef(self.state.version))
        else:
            ref = await self.learner.publish(self.ctx.weights_dir, self.state.version, self.rollout_dtype)
            await self.fleet.sync_weights(ref)
        return time.perf_counter() - t0

    async def _export_policy(self) -> None:
        """The final policy as a model folder (`rapo eval`, vLLM or transformers load it): the
        weights the rollout workers ran, beside the base model's config and tokenizer files."""
        self.phase = "exporting the policy"
        target = self.output_dir / "policy"
        target.mkdir(exist_ok=True)
        ref = await self.learner.publish(str(target), self.state.version, self.rollout_dtype)
        Path(ref.path).replace(target / "model.safetensors")
        for f in Path(self.ctx.model_dir).iterdir():
            weights = f.name.endswith((".safetensors", ".bin", ".pt", ".gguf"))
            weights = weights or f.name == "model.safetensors.index.json"
            if f.is_file() and not weights:
                shutil.copy2(f, target / f.name)
        (target / "rapo_policy.json").write_text(
            json.dumps({"run_id": self.ctx.run_id, "step": self.state.step, "version": self.state.version}))

    async def _ack(self) -> None:
        await self.stream.ack(self.unacked)
        self.unacked = []

    async def _restart_learner(self, error: BaseException) -> None:
        """A learner rank died: restart the group from the last checkpoint; the steps since are re-trained
        from their stream entries, which were not acknowledged."""
        st = self.state
        st.learner_restarts += 1
        if st.learner_restarts > 5:
            raise LearnerFailed(f"the learner failed {st.learner_restarts} times; last error: {error}") from error
        self.phase = "restarting the learner"
        log.warning("learner failed (%s); restarting from the last checkpoint", type(error).__name__)
        # Bounded: a rank stuck in a step (a timeout) never answers close; the group kills its ranks anyway.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.learner.close(), 60)
        self.learner = self._new_learner()
        self.learner_info = await self.learner.setup(self.ctx.model_dir, self.cfg.micro_batches_per_rank,
                                                     self.cfg.rollout.temperature)
        root = self.output_dir / "checkpoints"
        saved = RunState()  # no checkpoint yet: back to the start
        if latest_tag(root) is not None:
            tag, saved = load_latest(root)
            await self.learner.load_checkpoint(str(root), tag)
        st.step = saved.step
        st.counts["trained"] = saved.counts.get("trained", 0)
        st.trained_group_ids = saved.trained_group_ids
        st.history = [h for h in st.history if h["step"] <= saved.step]
        self.unacked = []
        self.replay_cursor = "0"
        async with self._weights_lock():
            st.version += 1
            await self._publish_weights()

    # ---- evaluation ----------------------------------------------------------------------------
    async def _evaluate(self, step: int) -> dict[str, float]:
        p = self.cfg.pipeline
        requests = eval_requests(self.data.heldout, p)
        t0 = time.perf_counter()
        trajs = await self.fleet.run_everywhere(requests, f"eval{step}")
        self.judge_tally.update(judge_tally(await self.rewards.score(trajs, self.questions)))
        metrics = {"step": step, **trajectory_metrics(trajs, "eval"), "time/eval_s": time.perf_counter() - t0}
        self.state.evals.append(metrics)
        ray_metrics.record_eval(metrics)  # dashboard: eval accuracy and time
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        (self.output_dir / "eval").mkdir(exist_ok=True)
        with open(self.output_dir / "eval" / f"step-{step:04d}.jsonl", "w") as fh:
            for t in trajs:
                fh.write(json.dumps(eval_row(t)) + "\n")
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------
    async def _checkpoint(self, step: int) -> None:
        """Learner state (all ranks, a collective) first, then the run state; `rapo_latest` moves
        last; then the stream entries the checkpoint covers are acknowledged."""
        self.phase = f"checkpointing (step {step})"
        root = self.output_dir / "checkpoints"
        tag = f"step-{step:06d}"
        await self.learner.save_checkpoint(str(root), tag)
        # In memory, elapsed_s stays the resumed runs' time and in_flight empty: the saved copy has both now.
        in_flight = [*self.running.values(), *self.requeue]
        replace(self.state, elapsed_s=self._wall_time_s(), in_flight=in_flight).save(root, tag)
        await self._ack()
        for old in checkpoint_tags(root)[: -self.cfg.learner.checkpoint_keep]:
            shutil.rmtree(root / old, ignore_errors=True)

    def _wall_time_s(self) -> float:
        """This run's wall time, the runs it resumes included."""
        return self.state.elapsed_s + time.time() - self.started

    def _load_run_state(self) -> str:
        """The resumed checkpoint's run state becomes this run's; returns the checkpoint's tag."""
        tag, self.state = load_latest(Path(self.ctx.resume_from))
        self.staleness.histogram = self.state.staleness
        return tag

    async def _restore_pipeline(self) -> None:
        """Groups trained after the checkpoint are pending in the stream (re-read first); groups that
        were running at the checkpoint and never reached the stream are run again."""
        self.replay_cursor = "0"
        in_flight, self.state.in_flight = self.state.in_flight, []
        published = await self.stream.was_published([g.group_id for g in in_flight])
        self.requeue.extend(g for g, done in zip(in_flight, published) if not done)
        for g, done in zip(in_flight, published):
            if done:  # scored and counted after the checkpoint: its epoch no longer waits for it
                self.state.pruning_epochs.settle(g.epoch, g.group_id)
        # Produced groups are the trained ones and those still in the stream (re-read or new): the
        # admission bound counts both, or the resumed run would start groups too early (too stale).
        self.admission.finished = self.state.counts["trained"] + await self.stream.depth()

    # ---- live changes and reporting -----------------------------------------------------------------
    async def scale(self, rollout_workers: int) -> dict:
        """Add or remove rollout workers while the run goes on (`rapo scale --rollout-workers N`)."""
        if rollout_workers < 1:
            raise ValueError("a run needs at least one rollout worker")
        if self.finishing or self.stop_requested:
            # Its last step is done or under way: a worker added now would take no work, and a
            # drained one could race the final eval.
            raise ValueError(f"the run is finishing ({self.phase}): nothing to scale")
        result = await self.fleet.scale(rollout_workers)
        await self._write_actor_table()
        return result

    async def request_stop(self) -> dict:
        """`rapo stop`: end the run after the step in progress, as if it were the last one (final eval,
        checkpoint, policy export, summary with status "stopped"); `--resume` continues it."""
        self.stop_requested = True
        return {"step": self.state.step, "steps": self.cfg.pipeline.steps, "phase": self.phase}

    async def actors(self) -> dict:
        """Names, pids and nodes of the run's actors (`rapo status`; the fault-injection tests)."""
        return {
            "controller": {"name": "controller", "pid": os.getpid(),
                           "node_id": ray.get_runtime_context().get_node_id()},
            "rollout": self.fleet.describe() if self.fleet else [],
            "learner": self.learner_info,
            "judge": await self.rewards.describe() if self.rewards else [],
        }

    async def _write_actor_table(self) -> None:
        """actors.json and status.json in the run folder, rewritten every step, for operators."""
        for name, payload in (("actors.json", await self.actors()), ("status.json", self.status())):
            tmp = self.output_dir / f"{name}.tmp"
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            tmp.replace(self.output_dir / name)

    async def _judge_metrics(self) -> dict[str, float]:
        client = await self.rewards.stats() if self.cfg.rewards.judge is not None else None  # summed over the actors
        return judge_metrics(self.judge_tally, client)

    def _pipeline_metrics(self) -> dict[str, float]:
        st = self.state
        out = {f"pipeline/{k}_groups": float(v) for k, v in st.counts.items()}
        out["pipeline/running_groups"] = float(len(self.running))
        out["pipeline/rollout_workers"] = float(self.fleet.size)
        out["pipeline/worker_restarts"] = float(self.fleet.restarts)
        out["pipeline/learner_restarts"] = float(st.learner_restarts)
        out.update(staleness_metrics(st.staleness))
        out["replay/injected_total"] = float(st.replay_injections)
        out["data/pruned_questions"] = float(len(self.pruned_questions))
        out["data/active_questions"] = float(self.scheduler.active)
        out["data/epoch"] = float(self.scheduler.state.epoch)
        elapsed = time.monotonic() - self.pipeline_started if self.pipeline_started else 0.0
        out.update(idle_fractions(elapsed, self.fleet.busy_seconds(), self.fleet_busy_at_start, self.learner_busy_s))
        return out

    def status(self) -> dict[str, Any]:
        st = self.state
        last = st.history[-1] if st.history else {}
        return {
            "phase": self.phase,
            "step": st.step,
            "steps": self.cfg.pipeline.steps,
            "version": st.version,
            "mode": self.cfg.pipeline.mode,
            "episodes": st.counts["trained"] * self.cfg.pipeline.samples_per_question,
            "reward": last.get("reward/mean"),
            "train_accuracy": last.get("train/accuracy"),
            "eval_accuracy": st.evals[-1]["eval/accuracy"] if st.evals else None,
            "step_time_s": last.get("time/step_s"),
            "rollout_workers": self.fleet.size if self.fleet else 0,
            "running_groups": len(self.running),
            **ray_metrics.endpoints(),  # dashboard_url, metrics_url
        }

    async def _summary(self, status: str) -> dict[str, Any]:
        replay = await self.replay.stats() if self.use_replay and self.redis is not None else None
        summary = run_summary(
            self.cfg, self.state, status=status, run_id=self.ctx.run_id, engine_kind=self.engine_kind,
            fleet_size=self.fleet.size if self.fleet else 0, worker_restarts=self.fleet.restarts if self.fleet else 0,
            eval_questions=len(self.data.heldout) if self.data is not None else 0,
            replay_stored=replay.stored if replay else 0,
            judge_stats=await self.rewards.stats() if self.rewards is not None else {},
            judge_tally=self.judge_tally, pruned_questions=len(self.pruned_questions),
            left_queued=await self.stream.depth() if self.redis is not None else 0,
            running=len(self.running), requeued=len(self.requeue), wall_time_s=self._wall_time_s(),
            model_dir=self.ctx.model_dir, model_source=self.ctx.model_meta.get("source", "path"), errors=self.errors,
            precision=self._precision(),
        )
        broadcaster = self.fleet.broadcaster if self.fleet is not None else None
        summary.update(weights_transport=self.weight_transport,
                       weight_groups_formed=broadcaster.groups_formed if broadcaster is not None else 0,
                       weight_receivers_joined=broadcaster.receivers_joined if broadcaster is not None else 0,
                       weight_receivers_mapped=broadcaster.receivers_mapped if broadcaster is not None else 0)
        return summary

    def _finish(self, summary: dict, status: str) -> None:
        path = self.output_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        if self.tracker is None:
            return
        history, evals = self.state.history, self.state.evals
        try:
            self.tracker.log_artifact(path)
            (self.output_dir / "history.json").write_text(json.dumps({"steps": history, "evals": evals}, indent=2))
            self.tracker.log_artifact(self.output_dir / "history.json")
            if self.cfg.tracking.plots and history:
                png = plot_curves(history, evals, self.output_dir / "reward_curve.png", f"{self.ctx.run_id}")
                self.tracker.log_artifact(png)
        finally:
            self.tracker.finish(status)

    async def shutdown(self) -> None:
        if self.fleet is not None:
            await self.fleet.shutdown()
        if self.learner is not None:
            await self.learner.close()
        if self.rewards is not None:
            await self.rewards.close()
        if self.redis is not None:
            await self.redis.aclose()


def controller_actor(node_id: str):
    """The Controller as a named, detached async actor pinned to ``node_id`` (the driver's node).

    Detached, so that `rapo scale` and `rapo status` find it by name; the CLI kills it when the
    run ends.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(Controller).options(
        name="controller", lifetime="detached", num_cpus=0, max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    )
