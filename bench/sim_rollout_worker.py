"""A stand-in rollout worker for bench/control_plane.py: episodes of a real size that cost nothing.

Its own small module, so that each of the many worker processes imports only this (not the
controller and everything it pulls in).
"""

from __future__ import annotations

import os
import statistics

import ray

from rollout.sim_engine import LatencyModel
from rollout.types import Question, ToolCall, Trajectory


def episode_tokens(turns: int, mean_turns: float, mean_tokens: int, limit: int) -> int:
    """An episode's length: proportional to its turns, ``mean_tokens`` on average, within [64, limit]."""
    return max(64, min(limit, round(mean_tokens * turns / mean_turns)))


@ray.remote
class SimRolloutWorker:
    """A rollout worker whose engine and tools take no time: each group comes back at once with
    trajectories of real size. Half the episodes answer correctly, so replay and pruning work."""

    def __init__(self, name: str, mean_tokens: int, max_tokens: int):
        self.name = name
        self.model = LatencyModel()
        self.mean_tokens, self.max_tokens = mean_tokens, max_tokens
        keys = [f"mean/{i}" for i in range(4000)]
        self.mean_turns = statistics.fmean(1 + self.model.tool_calls(k) for k in keys)
        self.version = 0

    def info(self) -> dict:
        return {"name": self.name, "engine": "control-plane-bench", "pid": os.getpid(), "version": self.version,
                "node_id": ray.get_runtime_context().get_node_id()}

    async def rollout(self, requests: list, tag: str) -> list[Trajectory]:
        return [self._episode(r) for r in requests]

    def _episode(self, req) -> Trajectory:
        q: Question = req.question
        calls = self.model.tool_calls(f"{q.question}/{req.seed}")
        n = episode_tokens(1 + calls, self.mean_turns, self.mean_tokens, self.max_tokens)
        prompt = min(n // 4, 512)
        ids = [(req.seed + i * 7919) % 150_000 for i in range(n)]  # real-size ints, not small cached ones
        mask = [0] * prompt + [1] * (n - prompt)
        logp = [0.0] * prompt + [-0.5 - (i % 7) * 0.1 for i in range(n - prompt)]
        tool_calls = [ToolCall("search_urls", {"query": f"{q.question} {i}"}, urls=[f"https://x.example/{q.id}/{i}"])
                      for i in range(calls)]
        answer = q.answer if (req.seed + req.sample_index) % 2 == 0 else "unknown"
        return Trajectory(q.id, req.sample_index, ids, mask, logp, prompt, tool_calls=tool_calls, answer=answer,
                          format_ok=True, num_turns=calls + 1, policy_version_start=self.version,
                          policy_version_end=self.version, worker=self.name).pack()  # as RolloutWorker returns them

    async def load_weights(self, ref) -> float:
        self.version = ref.version
        return 0.0

    async def shutdown(self) -> None:
        return None
