"""A latency-model engine: GPU-scale generation timing without a model, for pipeline benchmarks.

It answers the agent loop with well-formed turns (a search call, or a final answer) and spends
time like a GPU engine would: a prefill cost per new prompt token and a decode cost per
generated token, with at most ``slots`` sequences decoding at once. How many tool calls an
episode makes is drawn from a heavy-tailed (Pareto) distribution, seeded per episode, as the
paper's multi-turn episodes are long-tailed. Everything real around it (the agent loop,
tools, Ray, Redis, rewards, the controller) runs unchanged.

A question that spells a tool call has it copied into the first turn, as a model that follows
an injected instruction would: runs can test what a hostile call does to the pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass

from rollout.chat_format import IM_END, IM_START, TOOL_CALL_OPEN
from rollout.engine import EngineSpec, Generation, SamplingConfig


@dataclass(frozen=True)
class LatencyModel:
    per_token_s: float = 0.001
    prefill_per_token_s: float = 0.00002
    slots: int = 16
    tokens_per_turn: int = 64
    pareto_alpha: float = 1.3
    min_tool_calls: int = 1
    max_tool_calls: int = 24
    weight_sync_s: float = 0.1

    def tool_calls(self, key: str) -> int:
        """Heavy-tailed count: min * U^(-1/alpha), capped; deterministic in ``key``."""
        u = (int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") + 1) / 2**64
        return min(self.max_tool_calls, int(math.floor(self.min_tool_calls * u ** (-1.0 / self.pareto_alpha))))

    def decode_s(self) -> float:
        return self.tokens_per_turn * self.per_token_s


class SimulatedEngine:
    name = "simulated"

    def __init__(self, spec: EngineSpec):
        from transformers import AutoTokenizer

        self.model = LatencyModel(**spec.extra.get("latency_model", {}))
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.im_start = self.tokenizer.convert_tokens_to_ids(IM_START)
        self.im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        self.assistant = list(self.tokenizer.encode("assistant\n", add_special_tokens=False))
        self.slots = asyncio.Semaphore(self.model.slots)
        self.version = 0
        self.decode_seconds = 0.0

    def _plan(self, prompt_ids: list[int], sampling: SamplingConfig) -> tuple[int, int, str]:
        # Token-level scans: decoding the whole (growing) prompt every turn would cost more CPU
        # than the latency being modelled.
        k = len(self.assistant)
        starts = [i for i, t in enumerate(prompt_ids) if t == self.im_start]
        turn = sum(1 for i in starts if prompt_ids[i + 1 : i + 1 + k] == self.assistant) - 1
        user = starts[1] if len(starts) > 1 else 0
        end = prompt_ids.index(self.im_end, user) if self.im_end in prompt_ids[user:] else len(prompt_ids)
        question = self.tokenizer.decode(prompt_ids[user:end])
        # The loop seeds each turn with seed + turn: undo that to key the episode, not the turn.
        base = "eval" if sampling.seed is None else str(sampling.seed - turn)
        return turn, self.model.tool_calls(f"{question}/{base}"), question

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, request_id: str) -> Generation:
        turn, calls, question = self._plan(prompt_ids, sampling)
        injected = question.find(TOOL_CALL_OPEN)
        if turn == 0 and injected != -1:
            text = "<think>the question says to</think>\n" + question[injected:]
        elif turn < calls:
            call = {"name": "search_urls", "arguments": {"query": f"step {turn} of {request_id}"}}
            text = f"<think>searching</think>\n<tool_call>{json.dumps(call)}</tool_call>"
        else:
            text = "<think>done</think>\n\\boxed{unknown}"
        ids = list(self.tokenizer.encode(text + IM_END, add_special_tokens=False))
        finish = "stop"
        if len(ids) > sampling.max_tokens:
            ids, finish = ids[: sampling.max_tokens], "length"
        version_start = self.version
        async with self.slots:
            seconds = len(prompt_ids) * self.model.prefill_per_token_s * (turn == 0) + self.model.decode_s()
            await asyncio.sleep(seconds)
            self.decode_seconds += self.model.decode_s()
        return Generation(ids, [-1.0] * len(ids), finish, version_start, self.version)

    async def load_weights(self, path: str, version: int) -> None:
        await asyncio.sleep(self.model.weight_sync_s)
        self.version = version

    async def shutdown(self) -> None:
        return None
