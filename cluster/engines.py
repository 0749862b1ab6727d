"""A run's config turned into what the rollout side plays with: engine settings, episode limits,
the held-out eval's episode requests, and the row a scored eval episode is written as.

The controller (its rollout workers and held-out eval) and `rapo eval` both build their episodes
here, so `rapo eval RUN/policy` plays exactly the episodes the run's final eval played.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.config import PipelineConfig, RolloutConfig, RunConfig
from rollout.agent_loop import EpisodeLimits
from rollout.engine import EngineSpec
from rollout.episodes import EpisodeRequest, episode_seed
from rollout.types import Question, Trajectory


def eval_requests(questions: list[Question], p: PipelineConfig) -> list[EpisodeRequest]:
    """One episode per question at the eval temperature, seeded by the run seed and the question id."""
    return [
        EpisodeRequest(q, 0, temperature=p.eval_temperature, top_p=1.0, seed=episode_seed(p.seed, -1, q.id, 0))
        for q in questions
    ]


def rollout_dtype(r: RolloutConfig) -> str:
    """rollout.dtype, with auto = float32 on CPU workers (exact logprobs) and bfloat16 on GPU workers."""
    return r.dtype if r.dtype != "auto" else ("bfloat16" if r.num_gpus_per_worker > 0 else "float32")


def engine_spec(cfg: RunConfig, model_dir: Path, engine_kind: str, weight_transport: str = "file") -> EngineSpec:
    """`weight_transport` (resolved weights.transport): gloo and nccl give a vLLM engine the
    weight-transfer engine that transport's versions arrive through (rollout/weight_transport.py)."""
    r = cfg.rollout
    extra: dict = {"latency_model": r.latency_model.model_dump()} if engine_kind == "simulated" else {}
    if engine_kind == "vllm" and weight_transport != "file":
        from rollout.weight_transport import TRANSPORTS

        extra["weight_transfer_config"] = {"backend": TRANSPORTS[weight_transport].backend}
    return EngineSpec(
        model_dir=Path(model_dir), dtype=rollout_dtype(r), max_model_len=r.max_model_len, seed=cfg.pipeline.seed,
        kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
        max_num_seqs=r.max_concurrent_episodes, extra=extra,
    )


def episode_limits(r: RolloutConfig) -> EpisodeLimits:
    return EpisodeLimits(max_tool_calls=r.max_tool_calls, max_model_len=r.max_model_len,
                         max_tokens_per_turn=r.max_tokens_per_turn)


def eval_row(t: Trajectory) -> dict[str, Any]:
    """A scored eval episode as one line of `eval/step-XXXX.jsonl`."""
    row = {"id": t.question_id, "answer": t.answer, "correct": t.correct, "tool_calls": t.num_tool_calls,
           "response_tokens": t.generated_tokens, "finish_reason": t.finish_reason, "labels": list(t.labels)}
    return {**row, "error": t.error} if t.error else row
