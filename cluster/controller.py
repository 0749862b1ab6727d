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
import json
import logging
import os
import shutil
import time
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.learner_group import LearnerGroup
from actors.reward_pool import RewardPool
from actors.rollout_fleet import RolloutFleet, WorkerLost, rollout_worker_factory
from cluster.admission import Admission, StalenessPolicy
from cluster.config import RunConfig, flatten
from cluster.data import RunData, load_run_data
from cluster.engines import engine_spec, episode_limits, eval_requests, eval_row, rollout_dtype
from actors.redis_client import async_client
from cluster import ray_metrics
from cluster.run_metrics import reduce_learner, staleness_metrics, trajectory_metrics
from cluster.tracking import Tracker, plot_curves
from learner.batch import plan_step
from learner.group_stream import GroupStream
from learner.groups import ScoredGroup, batch_samples, inject_replays
from learner.pruning import PruningState
from learner.replay_buffer import ReplayBuffer
from learner.scheduler import PromptScheduler, SchedulerState
from rollout.engine_factory import resolve_engine_kind
from rollout.episodes import EpisodeRequest, episode_seed
from rollout.types import Question

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


@dataclass
class PendingGroup:
    group_id: str
    question_id: str
    epoch: int


class LearnerFailed(RuntimeError):
    pass


class Controller:
    def __init__(self, cfg: RunConfig, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx
        self.output_dir = Path(ctx.output_dir)
        p, lc = cfg.pipeline, cfg.learner
        self.phase = "starting"
        self.step = 0  # training steps done
        self.version = 0  # weight versions published
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, float]] = []
        self.tracker: Tracker | None = None
        self.mlflow_run_id: str | None = None
        self.engine_kind = resolve_engine_kind(cfg.rollout.engine)
        self.started = time.time()
        self.elapsed_before = 0.0  # wall time of the runs this one resumes
        self.errors: list[str] = []
        self.redis = None
        self.fleet: RolloutFleet | None = None
        self.rewards: RewardPool | None = None
        self.learner: LearnerGroup | None = None
        self.use_scaling, self.use_replay, self.use_pruning = (lc.feature("adv_scaling"), lc.feature("replay"), lc.feature("pruning"))
        # Pipeline state (checkpointed).
        self.admission = Admission(p.questions_per_step, p.staleness_bound)
        self.staleness = StalenessPolicy(p.staleness_bound, p.stale_action, p.stale_weight)
        self.group_counter = 0
        self.counts = Counter()  # admitted / trained / dropped / reruns / duplicates (groups)
        self.requeue: deque[PendingGroup] = deque()
        self.running: dict[str, PendingGroup] = {}
        self.epoch_open: Counter = Counter()
        self.epochs_ended: set[int] = set()
        self.pruned_questions: set[str] = set()
        self.replay_injections = 0
        self.learner_restarts = 0
        self.trained_group_ids: set[str] = set()
        self.unacked: list[str] = []
        self.replay_cursor: str | None = None  # read pending stream entries first (after a restart)
        self.trained = asyncio.Event()
        self.group_tasks: set[asyncio.Task] = set()
        self.judge_report = Counter()
        self.learner_busy_s = 0.0
        self.pipeline_started: float | None = None

    # ---- set-up -------------------------------------------------------------------------
    async def start(self) -> dict:
        cfg = self.cfg
        self.data: RunData = load_run_data(cfg)
        self.questions: dict[str, Question] = self.data.by_id()
        self.redis = async_client(self.ctx.redis_url, self.ctx.redis_password)
        await self.redis.ping()
        ns = self.ctx.namespace
        self.stream = GroupStream(self.redis, ns)
        await self.stream.ensure()
        self.replay = ReplayBuffer(self.redis, ns, threshold=cfg.learner.replay_threshold, max_entries=cfg.learner.replay_max_entries)
        self.pruning = PruningState(self.redis, ns, threshold=cfg.learner.prune_threshold)
        resumed = self._load_controller_state() if self.ctx.resume_from else None
        self.scheduler = PromptScheduler(
            [q.id for q in self.data.train], cfg.pipeline.seed, SchedulerState(**resumed["scheduler"]) if resumed else None
        )
        # The pruned set lives in Redis: a resumed (or restarted) run skips what was pruned before.
        self.pruned_questions = await self.pruning.pruned() if self.use_pruning else set()
        self.scheduler.prune(self.pruned_questions)

        self.phase = "starting actors"
        documents = ray.put(self.data.documents)
        self.fleet = RolloutFleet(self._worker_factory(documents), groups_per_worker=self._groups_per_worker(),
                                  weight_sync_timeout_s=cfg.pipeline.weight_sync_timeout_s)
        self.rewards = RewardPool.create(cfg.rewards, redis_url=self.ctx.redis_url, redis_password=self.ctx.redis_password, namespace=ns)
        self.learner = self._new_learner()
        results = await asyncio.gather(
            self.learner.setup(self.ctx.model_dir, cfg.micro_batches_per_rank, cfg.rollout.temperature),
            self.rewards.ready(), self.fleet.start(cfg.rollout.num_workers),
        )
        self.learner_info, self.worker_info = results[0], results[2]
        if resumed:
            self.phase = "restoring checkpoint"
            await self.learner.load_checkpoint(str(self.output_dir / "checkpoints"), resumed["tag"])
            await self._restore_pipeline(resumed)
            # The new workers get the checkpoint's weights under the checkpoint's version, so groups
            # it left in the stream stay as fresh as they were (their lag is what the uninterrupted
            # run would see); groups from later, lost versions have a negative lag and are re-run.
            await self._publish_weights()
        self.tracker = Tracker(self.ctx.tracking_uri, cfg.tracking.experiment, self.output_dir)
        self.mlflow_run_id = self.tracker.start(
            cfg.tracking.run_name or self.ctx.run_id, flatten(cfg),
            tags={"rapo.run_id": self.ctx.run_id, "rapo.engine": self.engine_kind, "rapo.mode": cfg.pipeline.mode,
                  "rapo.algorithm": cfg.learner.algorithm},
            resume_run_id=self.mlflow_run_id,
        )
        await self._write_actor_table()
        return {"mlflow_run_id": self.mlflow_run_id, "workers": self.worker_info, "learners": self.learner_info,
                "resumed_at_step": self.step if resumed else None}

    def _groups_per_worker(self) -> int:
        p, r = self.cfg.pipeline, self.cfg.rollout
        return p.groups_per_worker or max(1, r.max_concurrent_episodes // p.samples_per_question)

    def _worker_factory(self, documents):
        cfg, r = self.cfg, self.cfg.rollout
        self.rollout_dtype = rollout_dtype(r)
        spec = engine_spec(cfg, Path(self.ctx.model_dir), self.engine_kind)
        limits = episode_limits(r)
        options = {"num_cpus": r.num_cpus_per_worker, "num_gpus": r.num_gpus_per_worker, "resources": dict(r.resources) or None}
        redis = (self.ctx.redis_url, self.ctx.redis_password, self.ctx.namespace)
        return rollout_worker_factory(options, (self.engine_kind, spec, limits, cfg.tools, documents, self.ctx.weights_dir, redis))

    def _new_learner(self) -> LearnerGroup:
        lc = self.cfg.learner
        return LearnerGroup(lc, run_id=self.ctx.run_id, num_cpus=lc.num_cpus_per_rank, num_gpus=lc.num_gpus_per_rank)

    # ---- the run ----------------------------------------------------------------------------
    async def run(self) -> dict:
        cfg = self.cfg
        try:
            if not self.evals:
                self.phase = "evaluating (initial)"
                await self._evaluate(0)
            if self.step < cfg.pipeline.steps:
                await self._pipeline()
            if self.evals[-1]["step"] != self.step:
                self.phase = "evaluating (final)"
                await self._evaluate(self.step)
            await self._checkpoint(self.step)
            await self._export_policy()
            summary = await self._summary("completed")
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
            while not (self.admission.can_admit(self.step) and await self.fleet.has_capacity()):
                self.trained.clear()
                # Woken by a finished step, or a free worker slot (polled: scaling changes capacity).
                try:
                    await asyncio.wait_for(self.trained.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
            group = self.requeue.popleft() if self.requeue else self._draw()
            self.admission.admit()
            self.running[group.group_id] = group
            task = asyncio.ensure_future(self._run_group(group))
            self.group_tasks.add(task)
            task.add_done_callback(self.group_tasks.discard)
            await asyncio.sleep(0)

    def _draw(self) -> PendingGroup:
        draw = self.scheduler.next_batch(1)
        qid = draw.ids[0]
        epoch = draw.epochs[qid]
        self.epochs_ended.update(draw.ended)
        self.epoch_open[epoch] += 1
        self.group_counter += 1
        self.counts["admitted"] += 1
        return PendingGroup(f"g{self.group_counter}", qid, epoch)

    async def _run_group(self, group: PendingGroup) -> None:
        cfg, p = self.cfg, self.cfg.pipeline
        q = self.questions[group.question_id]
        requests = [
            EpisodeRequest(q, i, cfg.rollout.temperature, cfg.rollout.top_p, episode_seed(p.seed, group.group_id, q.id, i))
            for i in range(p.samples_per_question)
        ]
        try:
            t0 = time.perf_counter()
            while True:
                try:
                    trajs = await self.fleet.run_group(requests, group.group_id)
                    break
                except WorkerLost:
                    # Its worker died mid-episode: run the whole group again elsewhere.
                    self.counts["reruns"] += 1
            t1 = time.perf_counter()
            report = await self.rewards.score(trajs, self.questions)
            self._count_judged(report)
            scored = ScoredGroup(
                q.id, sorted(trajs, key=lambda t: t.sample_index), group.group_id, group.epoch,
                generate_s=t1 - t0, reward_s=time.perf_counter() - t1,
            )
            await self._assemble(scored)
            await self.stream.publish(scored)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.errors.append(f"group {group.group_id}: {type(e).__name__}: {str(e)[:500]}")
            log.exception("group %s failed", group.group_id)
            self.admission.abandon()
            self.running.pop(group.group_id, None)
            self.requeue.append(group)
            self.counts["failed_attempts"] += 1
            return
        self.running.pop(group.group_id, None)
        self.admission.finish()

    async def _assemble(self, group: ScoredGroup) -> None:
        """RAPO bookkeeping on a scored group before it goes to the learner.

        Pruning counts use the fresh rollouts; replay stores this group's newest success and,
        if every member failed, injects the question's stored success into the group.
        """
        if self.use_pruning:
            await self.pruning.record(group.epoch, ((m.question_id, bool(m.correct)) for m in group.members))
            self.epoch_open[group.epoch] -= 1
            for epoch in sorted(self.epochs_ended):
                if self.epoch_open[epoch] <= 0:
                    newly = await self.pruning.finish_epoch(epoch)
                    self.pruned_questions |= newly
                    self.scheduler.prune(newly)
                    self.epochs_ended.discard(epoch)
        if self.use_replay:
            fresh = [m for m in group.members if self.replay.eligible(m)]
            stored = [None]
            if group.all_failed:
                stored = await self.replay.get_many([group.question_id])
            rng = np.random.default_rng([self.cfg.pipeline.seed, zlib.crc32(group.group_id.encode()), 7])
            injected = sum(i is not None for i in inject_replays([group], stored, rng))
            self.replay_injections += injected
            await self.replay.count_injected(injected)
            if fresh:
                await self.replay.put(fresh[-1])

    # ---- trainer -------------------------------------------------------------------------------
    async def _trainer(self) -> None:
        cfg = self.cfg
        while self.step < cfg.pipeline.steps:
            step = self.step + 1
            t_step = time.perf_counter()
            self.phase = f"step {step}: waiting for {cfg.pipeline.questions_per_step} groups"
            t0 = time.perf_counter()
            entries = await self._take_batch()
            t_wait = time.perf_counter() - t0
            self.phase = f"step {step}: training"
            t0 = time.perf_counter()
            try:
                train = await self._train(entries, step)
                t_train = time.perf_counter() - t0
                self.phase = f"step {step}: syncing weights"
                self.version += 1
                t_sync = await self._publish_weights()
                # Only now may the next groups start: under the staleness bound, with the new weights.
                self.step = step
                self.unacked += [eid for eid, _ in entries]
                every = cfg.learner.checkpoint_every
                if every and step % every == 0 and step != cfg.pipeline.steps:
                    await self._checkpoint(step)
                elif not every:
                    # No checkpoints to roll back to: nothing would ever re-read these entries.
                    await self._ack()
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LearnerFailed) as e:
                await self._restart_learner(e)
                continue
            self.trained.set()
            self.learner_busy_s += t_train + t_sync
            trajs = [m for _, g in entries for m in g.members]
            metrics = {"step": step, "policy_version": self.version, "questions": sorted(g.question_id for _, g in entries)}
            metrics.update(trajectory_metrics(trajs, "train"))
            rewards = np.array([t.reward for t in trajs])
            metrics.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())})
            metrics.update(train)
            metrics.update({
                # Per group (they overlap each other and, when async, training): how long its
                # episodes took to generate and to label. wait_s is what the learner idled for.
                "time/generate_s": float(np.mean([g.generate_s for _, g in entries])),
                "time/reward_s": float(np.mean([g.reward_s for _, g in entries])),
                "time/wait_s": t_wait, "time/train_s": t_train, "time/weight_sync_s": t_sync,
                "time/step_s": time.perf_counter() - t_step,
            })
            metrics.update(self._pipeline_metrics())
            metrics.update(await self._judge_metrics())
            metrics["queue/groups_depth"] = await self.stream.depth()
            self.history.append(metrics)
            self.tracker.log_metrics(metrics, step)
            # Dashboard (Ray's metrics endpoint): this step; a group's staleness is counted at the version it trained at.
            ray_metrics.record_step(metrics, episodes=len(trajs), lags=[self.version - 1 - g.version_start for _, g in entries])
            await self._write_actor_table()
            if cfg.pipeline.eval_every and step % cfg.pipeline.eval_every == 0:
                self.phase = f"step {step}: evaluating"
                await self._evaluate(step)

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
                if group.group_id and group.group_id in self.trained_group_ids:
                    # Appended twice (a publish retried across a Redis restart): train it once.
                    self.counts["duplicates"] += 1
                    await self.stream.ack([eid])
                    continue
                weight = self.staleness.weight(self.version - group.version_start)
                if weight == 0.0:
                    self.counts["dropped"] += 1
                    self.admission.drop()
                    self.requeue.append(PendingGroup(group.group_id + "r", group.question_id, group.epoch))
                    await self.stream.ack([eid])
                    continue
                if weight != 1.0:
                    self.counts["downweighted"] += 1
                    group.weight = weight
                batch.append((eid, group))
        # Completion order varies from run to run; the batch a step trains on should not.
        return sorted(batch, key=lambda e: (len(e[1].group_id), e[1].group_id))

    async def _train(self, entries: list[tuple[str, ScoredGroup]], step: int) -> dict[str, float]:
        cfg = self.cfg
        groups = [g for _, g in entries]
        samples, scale, n_good = batch_samples(
            groups, std=cfg.learner.adv_std, eps=cfg.learner.adv_eps, scale=self.use_scaling, version=self.version,
            replay_on_policy=cfg.learner.replay_on_policy,
        )
        plans = plan_step(samples, cfg.learner.num_ranks, cfg.learner.mini_batches, seed=cfg.pipeline.seed * 100003 + step)
        sums = reduce_learner(await asyncio.wait_for(self.learner.train_step(plans), cfg.learner.timeout_s))
        for g in groups:
            if g.group_id:
                self.trained_group_ids.add(g.group_id)
        self.counts["trained"] += len(groups)
        out = {f"learner/{k}": v for k, v in sums.items()}
        out.update({
            "advantage/scale": scale, "advantage/good_groups": n_good, "advantage/groups": len(groups),
            "train/replayed_samples": sum(s.replayed for s in samples),
        })
        return out

    async def _publish_weights(self) -> float:
        t0 = time.perf_counter()
        ref = await self.learner.publish(self.ctx.weights_dir, self.version, self.rollout_dtype)
        await self.fleet.sync_weights(ref)
        return time.perf_counter() - t0

    async def _export_policy(self) -> None:
        """The final policy as a model folder (`rapo eval`, vLLM or transformers load it): the
        weights the rollout workers ran, beside the base model's config and tokenizer files."""
        self.phase = "exporting the policy"
        target = self.output_dir / "policy"
        target.mkdir(exist_ok=True)
        ref = await self.learner.publish(str(target), self.version, self.rollout_dtype)
        Path(ref.path).replace(target / "model.safetensors")
        for f in Path(self.ctx.model_dir).iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".gguf")) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, target / f.name)
        (target / "rapo_policy.json").write_text(json.dumps({"run_id": self.ctx.run_id, "step": self.step, "version": self.version}))

    async def _ack(self) -> None:
        await self.stream.ack(self.unacked)
        self.unacked = []

    async def _restart_learner(self, error: BaseException) -> None:
        """A learner rank died: restart the group from the last checkpoint; the steps since are re-trained
        from their stream entries, which were not acknowledged."""
        self.learner_restarts += 1
        if self.learner_restarts > 5:
            raise LearnerFailed(f"the learner failed {self.learner_restarts} times; last error: {error}") from error
        self.phase = "restarting the learner"
        log.warning("learner failed (%s); restarting from the last checkpoint", type(error).__name__)
        try:
            await self.learner.close()
        except Exception:
            pass
        self.learner = self._new_learner()
        self.learner_info = await self.learner.setup(self.ctx.model_dir, self.cfg.micro_batches_per_rank, self.cfg.rollout.temperature)
        root = self.output_dir / "checkpoints"
        step, trained = 0, 0
        if (root / "rapo_latest").exists():
            tag = (root / "rapo_latest").read_text().strip()
            await self.learner.load_checkpoint(str(root), tag)
            state = json.loads((root / tag / "controller.json").read_text())
            step, trained = state["step"], state["counts"].get("trained", 0)
            self.trained_group_ids = set(state["trained_group_ids"])
        else:
            self.trained_group_ids = set()
        self.step = step
        self.counts["trained"] = trained
        self.history = [h for h in self.history if h["step"] <= step]
        self.unacked = []
        self.replay_cursor = "0"
        self.version += 1
        await self._publish_weights()

    # ---- evaluation ----------------------------------------------------------------------------
    async def _evaluate(self, step: int) -> dict[str, float]:
        p = self.cfg.pipeline
        requests = eval_requests(self.data.heldout, p)
        t0 = time.perf_counter()
        trajs = await self.fleet.run_everywhere(requests, f"eval{step}")
        self._count_judged(await self.rewards.score(trajs, self.questions))
        metrics = {"step": step, **trajectory_metrics(trajs, "eval"), "time/eval_s": time.perf_counter() - t0}
        self.evals.append(metrics)
        ray_metrics.record_eval(metrics)  # dashboard: eval accuracy and time
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step) if self.tracker else None
        (self.output_dir / "eval").mkdir(exist_ok=True)
        with open(self.output_dir / "eval" / f"step-{step:04d}.jsonl", "w") as fh:
            for t in trajs:
                fh.write(json.dumps(eval_row(t)) + "\n")
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------
    async def _checkpoint(self, step: int) -> None:
        """Learner state (all ranks, a collective) first, then the controller's; `rapo_latest` moves
        last; then the stream entries the checkpoint covers are acknowledged."""
        self.phase = f"checkpointing (step {step})"
        root = self.output_dir / "checkpoints"
        tag = f"step-{step:06d}"
        await self.learner.save_checkpoint(str(root), tag)
        state = {
            "tag": tag, "step": step, "version": self.version, "scheduler": asdict(self.scheduler.state),
            "history": self.history, "evals": self.evals, "replay_injections": self.replay_injections,
            "mlflow_run_id": self.mlflow_run_id, "elapsed_s": self.elapsed_before + time.time() - self.started,
            "counts": dict(self.counts), "group_counter": self.group_counter,
            "in_flight": [asdict(g) for g in [*self.running.values(), *self.requeue]],
            "epoch_open": {str(k): v for k, v in self.epoch_open.items()}, "epochs_ended": sorted(self.epochs_ended),
            "trained_group_ids": sorted(self.trained_group_ids), "staleness": dict(self.staleness.histogram),
            "learner_restarts": self.learner_restarts,
        }
        (root / tag / "controller.json").write_text(json.dumps(state))
        tmp = root / "rapo_latest.tmp"
        tmp.write_text(tag)
        tmp.replace(root / "rapo_latest")
        await self._ack()
        tags = sorted(p.name for p in root.glob("step-*") if (p / "controller.json").exists())
        for old in tags[: -self.cfg.learner.checkpoint_keep]:
            shutil.rmtree(root / old, ignore_errors=True)

    def _load_controller_state(self) -> dict:
        root = Path(self.ctx.resume_from)
        tag = (root / "rapo_latest").read_text().strip()
        state = json.loads((root / tag / "controller.json").read_text())
        self.step, self.version = state["step"], state["version"]
        self.history, self.evals = state["history"], state["evals"]
        self.replay_injections = state["replay_injections"]
        self.mlflow_run_id = state["mlflow_run_id"]
        self.elapsed_before = state["elapsed_s"]
        self.counts = Counter(state["counts"])
        self.group_counter = state["group_counter"]
        self.epoch_open = Counter({int(k): v for k, v in state["epoch_open"].items()})
        self.epochs_ended = set(state["epochs_ended"])
        self.trained_group_ids = set(state["trained_group_ids"])
        self.staleness.histogram = Counter({int(k): v for k, v in state["staleness"].items()})
        self.learner_restarts = state["learner_restarts"]
        return state

    async def _restore_pipeline(self, state: dict) -> None:
        """Groups trained after the checkpoint are pending in the stream (re-read first); groups that
        were running at the checkpoint and never reached the stream are run again."""
        self.replay_cursor = "0"
        in_flight = [PendingGroup(**g) for g in state["in_flight"]]
        published = await self.stream.was_published([g.group_id for g in in_flight])
        self.requeue.extend(g for g, done in zip(in_flight, published) if not done)
        # Produced groups are the trained ones and those still in the stream (re-read or new): the
        # admission bound counts both, or the resumed run would start groups too early (too stale).
        self.admission.finished = self.counts["trained"] + await self.stream.depth()

    # ---- live changes and reporting -----------------------------------------------------------------
    async def scale(self, rollout_workers: int) -> dict:
        """Add or remove rollout workers while the run goes on (`rapo scale --rollout-workers N`)."""
        if rollout_workers < 1:
            raise ValueError("a run needs at least one rollout worker")
        result = await self.fleet.scale(rollout_workers)
        await self._write_actor_table()
        return result

    async def actors(self) -> dict:
        """Names, pids and nodes of the run's actors (`rapo status`; the fault-injection tests)."""
        return {
            "controller": {"name": "controller", "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()},
            "rollout": self.fleet.describe() if self.fleet else [],
            "learner": getattr(self, "learner_info", []),
            "judge": await self.rewards.describe() if self.rewards else [],
        }

    async def _write_actor_table(self) -> None:
        """actors.json and status.json in the run folder, rewritten every step, for operators."""
        for name, payload in (("actors.json", await self.actors()), ("status.json", self.status())):
            tmp = self.output_dir / f"{name}.tmp"
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            tmp.replace(self.output_dir / name)

    def _count_judged(self, report) -> None:
        """Adds a PoolReport (training group or evaluation) to the run's cumulative judge counts."""
        counts = {k: v for k, v in report.metrics().items() if k != "judge/latency_s"}
        counts["judge/latency_sum_s"] = report.latency_s
        self.judge_report.update(counts)

    async def _judge_metrics(self) -> dict[str, float]:
        """Cumulative: labels/<LABEL> counts, judge/retries, judge/fallbacks, judge/source_<source>, ...;
        judge/latency_s: mean time to judge one trajectory; with an LLM judge, its client's HTTP
        requests, their mean latency and failures by reason."""
        r = self.judge_report
        out = {k: float(v) for k, v in r.items() if k != "judge/latency_sum_s"}
        out["judge/latency_s"] = r["judge/latency_sum_s"] / r["judge/scored"] if r["judge/scored"] else 0.0
        if self.cfg.rewards.judge is not None:
            client = await self.rewards.stats()  # summed over the actors
            out["judge/requests"] = float(client.get("requests", 0))
            n = client.get("latency_count", 0)
            out["judge/request_latency_s"] = client.get("latency_sum_s", 0.0) / n if n else 0.0
            out.update({f"judge/{k}": float(v) for k, v in client.items() if k.startswith("failures_")})
        return out

    def _pipeline_metrics(self) -> dict[str, float]:
        out = {f"pipeline/{k}_groups": float(v) for k, v in self.counts.items()}
        out["pipeline/running_groups"] = float(len(self.running))
        out["pipeline/rollout_workers"] = float(self.fleet.size)
        out["pipeline/worker_restarts"] = float(self.fleet.restarts)
        out["pipeline/learner_restarts"] = float(self.learner_restarts)
        out.update(staleness_metrics(self.staleness.histogram))
        out["replay/injected_total"] = float(self.replay_injections)
        out["data/pruned_questions"] = float(len(self.pruned_questions))
        out["data/active_questions"] = float(self.scheduler.active)
        out["data/epoch"] = float(self.scheduler.state.epoch)
        elapsed = time.monotonic() - self.pipeline_started if self.pipeline_started else 0.0
        if elapsed > 0:
            busy = self.fleet.busy_seconds()
            base = getattr(self, "fleet_busy_at_start", {})
            used = sum(b - base.get(name, 0.0) for name, b in busy.items())
            out["pipeline/rollout_idle_fraction"] = max(0.0, 1 - used / (elapsed * max(1, len(busy))))
            out["pipeline/learner_idle_fraction"] = max(0.0, 1 - self.learner_busy_s / elapsed)
        return out

    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "phase": self.phase,
            "step": self.step,
            "steps": self.cfg.pipeline.steps,
            "version": self.version,
            "mode": self.cfg.pipeline.mode,
            "episodes": self.counts["trained"] * self.cfg.pipeline.samples_per_question,
            "reward": last.get("reward/mean"),
            "train_accuracy": last.get("train/accuracy"),
            "eval_accuracy": self.evals[-1]["eval/accuracy"] if self.evals else None,
            "step_time_s": last.get("time/step_s"),
            "rollout_workers": self.fleet.size if self.fleet else 0,
            "running_groups": len(self.running),
            **ray_metrics.endpoints(),  # dashboard_url, metrics_url
        }

    async def _summary(self, status: str) -> dict[str, Any]:
        cfg = self.cfg
        n = cfg.pipeline.samples_per_question
        first = self.evals[0] if self.evals else {}
        final = self.evals[-1] if len(self.evals) > 1 else {}
        steps = self.history
        mean = lambda key: float(np.mean([h[key] for h in steps if key in h])) if steps else None  # noqa: E731
        replay = await self.replay.stats() if self.use_replay and self.redis is not None else None
        judge = await self.rewards.stats() if self.rewards is not None else {}
        left_queued = await self.stream.depth() if self.redis is not None else 0
        c = self.counts
        # Every admitted group is trained, dropped as stale (and re-admitted), still queued or running
        # at the end; anything else was lost.
        lost_groups = c["admitted"] - c["trained"] - left_queued - len(self.running) - len(self.requeue)
        return {
            "status": status,
            "run_id": self.ctx.run_id,
            "mlflow_run_id": self.mlflow_run_id,
            "mode": cfg.pipeline.mode,
            "max_staleness": cfg.pipeline.staleness_bound,
            "algorithm": cfg.learner.algorithm,
            "steps": len(steps),
            "episodes": c["trained"] * n,
            "engine": self.engine_kind,
            "learner": "deepspeed" if cfg.learner.backend == "deepspeed" else cfg.learner.backend,
            "zero_stage": cfg.learner.zero_stage,
            "learner_ranks": cfg.learner.num_ranks,
            "rollout_workers": self.fleet.size if self.fleet else 0,
            "weight_versions_published": self.version,
            "accuracy_initial": first.get("eval/accuracy"),
            "accuracy_final": final.get("eval/accuracy"),
            "eval_questions": len(self.data.heldout) if hasattr(self, "data") else 0,
            "reward_first_step": steps[0]["reward/mean"] if steps else None,
            "reward_last_step": steps[-1]["reward/mean"] if steps else None,
            "tool_calls_per_episode": mean("train/tool_calls_per_episode"),
            "response_tokens_per_episode": mean("train/response_tokens"),
            "mean_step_time_s": mean("time/step_s"),
            "replay_injections": self.replay_injections,
            "replay_stored": replay.stored if replay else 0,
            "pruned_questions": len(self.pruned_questions),
            "reward_stage": cfg.rewards.stage,
            "judge": "llm" if cfg.rewards.judge else "rule",
            "judge_requests": judge.get("requests", 0),
            "judge_fallbacks": judge.get("fallbacks", 0),
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.histogram.items())},
            "dropped_stale_groups": c["dropped"],
            "lost_episodes": max(0, lost_groups) * n,
            "leftover_episodes": (left_queued + len(self.running)) * n,
            "restarts": {"rollout_workers": self.fleet.restarts if self.fleet else 0, "learner": self.learner_restarts,
                         "reward_actors": int(self.judge_report.get("judge/actor_failures", 0))},
            "rerun_groups": c["reruns"],
            "wall_time_s": self.elapsed_before + time.time() - self.started,
            "model_dir": self.ctx.model_dir,
            "model_source": self.ctx.model_meta.get("source", "path"),
            "errors": self.errors,
        }

    def _finish(self, summary: dict, status: str) -> None:
        path = self.output_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        if self.tracker is None:
            return
        try:
            self.tracker.log_artifact(path)
            (self.output_dir / "history.json").write_text(json.dumps({"steps": self.history, "evals": self.evals}, indent=2))
            self.tracker.log_artifact(self.output_dir / "history.json")
            if self.cfg.tracking.plots and self.history:
                png = plot_curves(self.history, self.evals, self.output_dir / "reward_curve.png", f"{self.ctx.run_id}")
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
