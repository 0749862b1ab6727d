"""RolloutWorker actor: one generation engine plus the agent loop, many episodes in flight."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import ray

from rollout.agent_loop import AgentLoop, EpisodeLimits, EpisodeSampling
from rollout.engine import EngineSpec
from rollout.engine_factory import create_engine
from rollout.episodes import EpisodeRequest
from rollout.tools.backends import tool_backend
from rollout.tools.toolbox import Toolbox
from rollout.types import Trajectory
from rollout.weights import WeightRef


@ray.remote
class RolloutWorker:
    def __init__(
        self,
        name: str,
        engine_kind: str,
        spec: EngineSpec,
        limits: EpisodeLimits,
        tools,
        documents,
        weights_dir: str,
        redis: tuple[str, str | None, str] | None = None,
    ):
        from transformers import AutoTokenizer

        self.name = name
        self.weights_dir = Path(weights_dir)
        t0 = time.perf_counter()
        self.engine = create_engine(engine_kind, spec)
        tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.backend = tool_backend(tools, documents, redis)
        extractor = None
        if tools.extractor is not None:
            from rollout.tools.extractor import LLMExtractor

            extractor = LLMExtractor(tools.extractor)
        self.extractor = extractor
        self.loop = AgentLoop(self.engine, Toolbox.from_config(tools, self.backend, extractor), tokenizer, limits)
        self.max_concurrency = spec.max_num_seqs
        # One gate for the worker: max_concurrency caps its episodes across every group it runs.
        # Made on first use, in the actor's event loop.
        self.gate: asyncio.Semaphore | None = None
        self.startup_s = time.perf_counter() - t0

    def info(self) -> dict:
        return {
            "name": self.name,
            "engine": self.engine.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "startup_s": self.startup_s,
            "version": self.engine.version,
            # Ranks its engine takes in a weight group (weights.transport gloo / nccl).
            "weight_ranks": getattr(self.engine, "weight_ranks", 1),
        }

    async def rollout(self, requests: list[EpisodeRequest], tag: str) -> list[Trajectory]:
        if self.gate is None:
            self.gate = asyncio.Semaphore(self.max_concurrency)
        gate = self.gate

        async def one(i: int, req: EpisodeRequest) -> Trajectory:
            # One episode's error boundary (the loop has its own; this one catches what escapes it):
            # a failure is that episode's record, and the group's other episodes go on.
            async with gate:
                sampling = EpisodeSampling(req.temperature, req.top_p, req.seed)
                try:
                    traj = await self.loop.run(req.question, req.sample_index, sampling, f"{self.name}-{tag}-{i}")
                except Exception as e:  # noqa: BLE001
                    traj = Trajectory.failed(req.question.id, req.sample_index, e, version=self.engine.version)
                traj.worker = self.name
                return traj.pack()  # arrays: cheap to ship, and the controller does not convert them

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    async def load_weights(self, ref: WeightRef) -> float:
        t0 = time.perf_counter()
        path = ref.path
        if ref.node_id != ray.get_runtime_context().get_node_id():
            # Another node: fetch the file through the object store once, then load it locally.
            blob = await ref.source.read_file.remote(ref.path)
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            path = str(self.weights_dir / f"{self.name}-v{ref.version}.safetensors")
            Path(path).write_bytes(blob)
        await self.engine.load_weights(path, ref.version)
        if path != ref.path:
            os.unlink(path)
        return time.perf_counter() - t0

    async def join_weight_group(self, init_info: dict) -> None:
        await self.engine.join_weight_group(init_info)

    async def receive_weights(self, updates: list[dict], version: int) -> float:
        """One version through the engine's weight-transfer protocol (weights.transport gloo / nccl)."""
        t0 = time.perf_counter()
        await self.engine.receive_weights(updates, version)
        return time.perf_counter() - t0

    async def shutdown(self) -> None:
        await self.engine.shutdown()
        await self.backend.close()
        if self.extractor is not None:
            await self.extractor.close()
