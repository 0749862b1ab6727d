"""The generation-engine interface the agent loop needs (engines are built in rollout.engine_factory).

Token ids in, token ids and per-token logprobs out. vLLM implements it (AsyncLLM, on CPU
or GPU); a transformers engine implements it where vLLM cannot be imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    # "stop" (the model ended its turn), "length" (hit max_tokens), "abort".
    finish_reason: str
    # Policy versions that produced the first and the last token of this turn.
    version_start: int = 0
    version_end: int = 0


@dataclass(frozen=True)
class EngineSpec:
    model_dir: Path
    dtype: str = "float32"
    max_model_len: int = 2048
    seed: int = 0
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True
    max_num_seqs: int = 64
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    name: str
    version: int

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, request_id: str) -> Generation: ...

    async def load_weights(self, path: str, version: int) -> None: ...

    async def shutdown(self) -> None: ...
