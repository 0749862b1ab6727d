"""The controller: wires rollout workers, rewards, the group stream and the learner group into a run.

It runs as a named Ray actor ("controller") pinned to the driver's node, so the run folder
and a local tracking store are on local disk. Sync mode: generate a batch, score it,
hand the groups to the learner through the Redis stream, train, publish weights, repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.learner_group import LearnerGroup
from actors.reward_pool import RewardPool
from actors.rollout_worker import EpisodeRequest, RolloutWorker
from cluster.config import RunConfig, flatten
from cluster.data import RunData, load_run_data
from cluster.redis_server import async_client
from cluster.tracking import Tracker, plot_curves
from learner.batch import plan_step
from learner.group_stream import GroupStream
from learner.groups import ScoredGroup, batch_samples, group_by_question, inject_replays
from learner.pruning import PruningState
from learner.replay_buffer import ReplayBuffer
from learner.scheduler import PromptScheduler, SchedulerState
from rollout.agent_loop import EpisodeLimits
from rollout.engine import EngineSpec, resolve_engine_kind
from rollout.types import Question, Trajectory


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


def episode_seed(run_seed: int, step: int, question_id: str, sample: int) -> int:
    digest = hashlib.blake2b(f"{run_seed}/{step}/{question_id}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def trajectory_metrics(trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    if not trajs:
        return {}
    out = {
        f"{prefix}/accuracy": float(np.mean([bool(t.correct) for t in trajs])),
        f"{prefix}/format_ok": float(np.mean([t.format_ok for t in trajs])),
        f"{prefix}/tool_calls_per_episode": float(np.mean([t.num_tool_calls for t in trajs])),
        f"{prefix}/response_tokens": float(np.mean([t.generated_tokens for t in trajs])),
        f"{prefix}/episode_tokens": float(np.mean([len(t.token_ids) for t in trajs])),
        f"{prefix}/turns": float(np.mean([t.num_turns for t in trajs])),
    }
    if all(t.reward is not None for t in trajs):
        out[f"{prefix}/reward"] = float(np.mean([t.reward for t in trajs]))
    for reason in ("answered", "max_tool_calls", "context", "turn_length"):
        out[f"{prefix}/finish_{reason}"] = float(np.mean([t.finish_reason == reason for t in trajs]))
    bad_calls = [c for t in trajs for c in t.tool_calls if not c.ok]
    calls = sum(t.num_tool_calls for t in trajs)
    out[f"{prefix}/tool_error_rate"] = len(bad_calls) / calls if calls else 0.0
    return out


class Controller:
    def __init__(self, cfg: RunConfig, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx
        self.output_dir = Path(ctx.output_dir)
        self.phase = "starting"
        self.step = 0
        self.version = 0
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.workers: list = []
        self.learner: LearnerGroup | None = None
        self.tracker: Tracker | None = None
        self.mlflow_run_id: str | None = None
        self.engine_kind = resolve_engine_kind(cfg.rollout.engine)
        self.started = time.time()
        self.elapsed_before = 0.0  # wall time of the runs this one resumes
        self.episodes = 0
        self.replay_injections = 0
        self.pruned_questions: set[str] = set()
        self.errors: list[str] = []
        self.worker_info: list[dict] = []
        self.redis = None
        lc = cfg.learner
        self.use_scaling, self.use_replay, self.use_pruning = (lc.feature("adv_scaling"), lc.feature("replay"), lc.feature("pruning"))

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
        state = SchedulerState(**resumed["scheduler"]) if resumed else None
        self.scheduler = PromptScheduler([q.id for q in self.data.train], cfg.pipeline.seed, state)
        # The pruned set lives in Redis: a resumed (or restarted) run skips what was pruned before.
        self.pruned_questions = await self.pruning.pruned() if self.use_pruning else set()
        self.scheduler.prune(self.pruned_questions)

        self.phase = "starting actors"
        documents = ray.put(self.data.documents)
        self.workers = [self._make_worker(i, documents) for i in range(cfg.rollout.num_workers)]
        self.rewards = RewardPool.create(
            cfg.rewards, redis_url=self.ctx.redis_url, redis_password=self.ctx.redis_password, namespace=ns
        )
        lc = cfg.learner
        self.learner = LearnerGroup(lc, run_id=self.ctx.run_id, num_cpus=lc.num_cpus_per_rank, num_gpus=lc.num_gpus_per_rank)
        learner_setup = self.learner.setup(self.ctx.model_dir, cfg.micro_batches_per_rank, cfg.rollout.temperature)
        results = await asyncio.gather(learner_setup, self.rewards.ready(), *(w.info.remote() for w in self.workers))
        self.learner_info, self.worker_info = results[0], list(results[2:])
        if resumed:
            self.phase = "restoring checkpoint"
            await self.learner.load_checkpoint(str(self.output_dir / "checkpoints"), resumed["tag"])
            await self._publish_weights()
        self.tracker = Tracker(self.ctx.tracking_uri, cfg.tracking.experiment, self.output_dir)
        self.mlflow_run_id = self.tracker.start(
            cfg.tracking.run_name or self.ctx.run_id, flatten(cfg),
            tags={"rapo.run_id": self.ctx.run_id, "rapo.engine": self.engine_kind, "rapo.mode": cfg.pipeline.mode,
                  "rapo.algorithm": cfg.learner.algorithm},
            resume_run_id=self.mlflow_run_id,
        )
        return {"mlflow_run_id": self.mlflow_run_id, "workers": self.worker_info, "learners": self.learner_info,
                "resumed_at_step": self.step if resumed else None}

    def _make_worker(self, index: int, documents):
        cfg = self.cfg
        r = cfg.rollout
        gpu = r.num_gpus_per_worker > 0
        dtype = r.dtype if r.dtype != "auto" else ("bfloat16" if gpu else "float32")
        self.rollout_dtype = dtype
        spec = EngineSpec(
            model_dir=Path(self.ctx.model_dir), dtype=dtype, max_model_len=r.max_model_len, seed=cfg.pipeline.seed + index,
            kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
            max_num_seqs=r.max_concurrent_episodes,
        )
        limits = EpisodeLimits(max_tool_calls=r.max_tool_calls, max_model_len=r.max_model_len, max_tokens_per_turn=r.max_tokens_per_turn)
        return RolloutWorker.options(name=f"rollout-{index}", num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker).remote(
            f"rollout-{index}", self.engine_kind, spec, limits, cfg.tools, documents, self.ctx.weights_dir
        )

    # ---- the loop -------------------------------------------------------------------------
    async def run(self) -> dict:
        cfg = self.cfg
        try:
            if not self.evals:
                self.phase = "evaluating (initial)"
                await self._evaluate(0)
            for step in range(self.step + 1, cfg.pipeline.steps + 1):
                self.step = step
                await self._sync_step(step)
                every = cfg.learner.checkpoint_every
                if every and step % every == 0 and step != cfg.pipeline.steps:
                    await self._checkpoint(step)
                if cfg.pipeline.eval_every and step % cfg.pipeline.eval_every == 0 and step != cfg.pipeline.steps:
                    self.phase = f"evaluating (step {step})"
                    await self._evaluate(step)
            if self.evals[-1]["step"] != self.step:
                self.phase = "evaluating (final)"
                await self._evaluate(self.step)
            await self._checkpoint(self.step)
            summary = await self._summary("completed")
            self._finish(summary, "FINISHED")
            return summary
        except BaseException as e:
            # The first lines say what happened; a whole remote traceback would drown the summary.
            self.errors.append(f"{type(e).__name__}: {str(e)[:2000]}")
            summary = await self._summary("failed")
            self._finish(summary, "FAILED")
            raise

    async def _rollout(self, requests: list[EpisodeRequest], tag: str) -> list[Trajectory]:
        # Deal whole requests round-robin; each worker runs its share concurrently.
        shares = [requests[i :: len(self.workers)] for i in range(len(self.workers))]
        results = await asyncio.gather(*(w.rollout.remote(s, tag) for w, s in zip(self.workers, shares) if s))
        return [t for part in results for t in part]

    async def _sync_step(self, step: int) -> None:
        cfg, p = self.cfg, self.cfg.pipeline
        t_step = time.perf_counter()
        self.phase = f"step {step}: generating"
        draw = self.scheduler.next_batch(p.questions_per_step)
        requests = [
            EpisodeRequest(self.questions[q], i, cfg.rollout.temperature, cfg.rollout.top_p, episode_seed(p.seed, step, q, i))
            for q in draw.ids for i in range(p.samples_per_question)
        ]
        t0 = time.perf_counter()
        trajs = await self._rollout(requests, f"s{step}")
        t_gen = time.perf_counter() - t0

        self.phase = f"step {step}: scoring"
        t0 = time.perf_counter()
        judged = await self.rewards.score(trajs, self.questions)
        groups = group_by_question(trajs, p.samples_per_question)
        assembly = await self._assemble(groups, draw, step)
        t_reward = time.perf_counter() - t0

        self.phase = f"step {step}: training"
        t0 = time.perf_counter()
        train = await self._train_on_stream(len(groups), step)
        t_train = time.perf_counter() - t0

        self.phase = f"step {step}: syncing weights"
        t0 = time.perf_counter()
        self.version += 1
        await self._publish_weights()
        t_sync = time.perf_counter() - t0

        self.episodes += len(trajs)
        metrics = {"step": step, "policy_version": self.version, "questions": draw.ids}
        metrics.update(trajectory_metrics(trajs, "train"))
        rewards = np.array([t.reward for t in trajs])
        metrics["reward/mean"] = float(rewards.mean())
        metrics["reward/std"] = float(rewards.std())
        metrics.update(assembly)
        metrics.update(train)
        metrics.update(judged.metrics())
        metrics.update({
            "time/generate_s": t_gen, "time/reward_s": t_reward, "time/train_s": t_train, "time/weight_sync_s": t_sync,
            "time/step_s": time.perf_counter() - t_step,
        })
        metrics["train/generated_tokens_per_s"] = sum(t.generated_tokens for t in trajs) / max(t_gen, 1e-9)
        metrics["queue/groups_depth"] = await self.stream.depth()
        self.history.append(metrics)
        self.tracker.log_metrics(metrics, step)

    async def _assemble(self, groups: list[ScoredGroup], draw, step: int) -> dict[str, float]:
        """RAPO bookkeeping on scored groups, then hand them to the learner through the stream.

        Pruning counts use the fresh rollouts only; replay injects a stored success into
        all-fail groups, and stores this step's newest success of each question.
        """
        out: dict[str, float] = {}
        if self.use_pruning:
            by_epoch: dict[int, list[tuple[str, bool]]] = {}
            for g in groups:
                by_epoch.setdefault(draw.epochs[g.question_id], []).extend((m.question_id, bool(m.correct)) for m in g.members)
            for epoch, outcomes in by_epoch.items():
                await self.pruning.record(epoch, outcomes)
            for epoch in draw.ended:
                newly = await self.pruning.finish_epoch(epoch)
                self.pruned_questions |= newly
                self.scheduler.prune(newly)
            out["data/pruned_questions"] = len(self.pruned_questions)
            out["data/active_questions"] = self.scheduler.active
        out["data/epoch"] = self.scheduler.state.epoch
        if self.use_replay:
            failed = [g for g in groups if g.all_failed]
            stored = await self.replay.get_many([g.question_id for g in failed])
            plan = inject_replays(failed, stored, np.random.default_rng([self.cfg.pipeline.seed, step, 7]))
            injected = sum(i is not None for i in plan)
            self.replay_injections += injected
            await self.replay.count_injected(injected)
            for g in groups:
                fresh = [m for m in g.members if self.replay.eligible(m)]
                if fresh:
                    await self.replay.put(fresh[-1])
            stats = await self.replay.stats()
            out.update({
                "replay/injected": injected, "replay/all_fail_groups": len(failed), "replay/stored": stats.stored,
                "replay/hit_rate": stats.hit_rate, "replay/injected_total": self.replay_injections,
            })
        for g in groups:
            await self.stream.publish(g)
        return out

    async def _train_on_stream(self, count: int, step: int) -> dict[str, float]:
        cfg = self.cfg
        entries = await self._read_groups(count)
        groups = [g for _, g in entries]
        samples, scale, n_good = batch_samples(
            groups, std=cfg.learner.adv_std, eps=cfg.learner.adv_eps, scale=self.use_scaling, version=self.version,
            replay_on_policy=cfg.learner.replay_on_policy,
        )
        plans = plan_step(samples, cfg.learner.num_ranks, cfg.learner.mini_batches, seed=cfg.pipeline.seed * 100003 + step)
        sums = self._reduce(await self.learner.train_step(plans))
        await self.stream.ack([eid for eid, _ in entries])
        out = {f"learner/{k}": v for k, v in sums.items()}
        out.update({
            "advantage/scale": scale, "advantage/good_groups": n_good, "advantage/groups": len(groups),
            "train/replayed_samples": sum(s.replayed for s in samples),
        })
        stale = [s.staleness for s in samples if not s.replayed]
        out["staleness/mean"] = float(np.mean(stale)) if stale else 0.0
        out["staleness/max"] = float(max(stale)) if stale else 0.0
        return out

    async def _publish_weights(self) -> None:
        ref = await self.learner.publish(self.ctx.weights_dir, self.version, self.rollout_dtype)
        await asyncio.gather(*(w.load_weights.remote(ref) for w in self.workers))

    async def _read_groups(self, count: int) -> list[tuple[str, ScoredGroup]]:
        # Entries left unacknowledged by an interrupted step come first: nothing is lost or trained twice.
        entries = (await self.stream.pending(count))[:count]
        deadline = time.monotonic() + 60
        while len(entries) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the group stream delivered {len(entries)} of {count} groups within 60 s")
            entries += await self.stream.read(count - len(entries), block_ms=1000)
        return entries

    @staticmethod
    def _reduce(per_rank: list[dict]) -> dict[str, float]:
        total = {k: sum(r[k] for r in per_rank) for k in per_rank[0]}
        tokens = max(total.pop("tokens"), 1.0)
        out = {k: total[k] / tokens for k in ("pg_loss", "kl", "entropy", "clip_frac", "ratio", "is_weight", "prox_behaviour_abs_diff")}
        out["loss"] = total["loss"]
        out["tokens"] = tokens
        out["grad_norm"] = max(r["grad_norm"] for r in per_rank)
        out["rank_time_s"] = max(r["train_time_s"] for r in per_rank)
        return out

    async def _evaluate(self, step: int) -> dict[str, float]:
        p = self.cfg.pipeline
        requests = [
            EpisodeRequest(q, 0, temperature=p.eval_temperature, top_p=1.0, seed=episode_seed(p.seed, -1, q.id, 0))
            for q in self.data.heldout
        ]
        t0 = time.perf_counter()
        trajs = await self._rollout(requests, f"eval{step}")
        await self.rewards.score(trajs, self.questions)
        metrics = {"step": step, **trajectory_metrics(trajs, "eval"), "time/eval_s": time.perf_counter() - t0}
        self.evals.append(metrics)
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        (self.output_dir / "eval").mkdir(exist_ok=True)
        with open(self.output_dir / "eval" / f"step-{step:04d}.jsonl", "w") as fh:
            for t in trajs:
                fh.write(json.dumps({"id": t.question_id, "answer": t.answer, "correct": t.correct,
                                     "tool_calls": t.num_tool_calls, "response_tokens": t.generated_tokens,
                                     "finish_reason": t.finish_reason}) + "\n")
        return metrics

    # ---- checkpoints --------------------------------------------------------------------------
    async def _checkpoint(self, step: int) -> None:
        """Learner state (all ranks, a collective) first, then the controller's; `latest` moves last."""
        self.phase = f"checkpointing (step {step})"
        root = self.output_dir / "checkpoints"
        tag = f"step-{step:06d}"
        await self.learner.save_checkpoint(str(root), tag)
        state = {
            "tag": tag, "step": step, "version": self.version, "episodes": self.episodes,
            "scheduler": asdict(self.scheduler.state), "history": self.history, "evals": self.evals,
            "replay_injections": self.replay_injections, "mlflow_run_id": self.mlflow_run_id,
            "elapsed_s": self.elapsed_before + time.time() - self.started,
        }
        (root / tag / "controller.json").write_text(json.dumps(state))
        tmp = root / "rapo_latest.tmp"
        tmp.write_text(tag)
        tmp.replace(root / "rapo_latest")
        tags = sorted(p.name for p in root.glob("step-*") if (p / "controller.json").exists())
        for old in tags[: -self.cfg.learner.checkpoint_keep]:
            shutil.rmtree(root / old, ignore_errors=True)

    def _load_controller_state(self) -> dict:
        root = Path(self.ctx.resume_from)
        tag = (root / "rapo_latest").read_text().strip()
        state = json.loads((root / tag / "controller.json").read_text())
        self.step, self.version, self.episodes = state["step"], state["version"], state["episodes"]
        self.history, self.evals = state["history"], state["evals"]
        self.replay_injections = state["replay_injections"]
        self.mlflow_run_id = state["mlflow_run_id"]
        self.elapsed_before = state["elapsed_s"]
        return state

    # ---- reporting --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "phase": self.phase,
            "step": self.step,
            "steps": self.cfg.pipeline.steps,
            "version": self.version,
            "episodes": self.episodes,
            "reward": last.get("reward/mean"),
            "train_accuracy": last.get("train/accuracy"),
            "eval_accuracy": self.evals[-1]["eval/accuracy"] if self.evals else None,
            "step_time_s": last.get("time/step_s"),
        }

    async def _summary(self, status: str) -> dict[str, Any]:
        first = self.evals[0] if self.evals else {}
        final = self.evals[-1] if len(self.evals) > 1 else {}
        steps = self.history
        mean = lambda key: float(np.mean([h[key] for h in steps])) if steps else None  # noqa: E731
        replay = await self.replay.stats() if self.use_replay and self.redis is not None else None
        judge = await self.rewards.stats() if getattr(self, "rewards", None) is not None else {}
        return {
            "status": status,
            "run_id": self.ctx.run_id,
            "mlflow_run_id": self.mlflow_run_id,
            "mode": self.cfg.pipeline.mode,
            "algorithm": self.cfg.learner.algorithm,
            "steps": len(steps),
            "episodes": self.episodes,
            "engine": self.engine_kind,
            "learner": "deepspeed",
            "zero_stage": self.cfg.learner.zero_stage,
            "learner_ranks": self.cfg.learner.num_ranks,
            "rollout_workers": len(self.workers),
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
            "reward_stage": self.cfg.rewards.stage,
            "judge": "llm" if self.cfg.rewards.judge else "rule",
            "judge_requests": judge.get("requests", 0),
            "judge_fallbacks": judge.get("fallbacks", 0),
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
        tasks = [w.shutdown.remote() for w in self.workers]
        if tasks:
            await asyncio.wait([asyncio.ensure_future(t) for t in tasks], timeout=30)
        if self.learner is not None:
            await self.learner.close()
        if getattr(self, "rewards", None) is not None:
            await self.rewards.close()
        for w in self.workers:
            ray.kill(w)
        if self.redis is not None:
            await self.redis.aclose()


def controller_actor(node_id: str):
    """The Controller as a named async actor, pinned to ``node_id`` (the driver's node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(Controller).options(
        name="controller", num_cpus=0, max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    )
