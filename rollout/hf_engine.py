"""A transformers engine behind the same interface, for machines where vLLM cannot be imported.

Requests that arrive together are batched (left padding) and generated in a worker thread,
so the agent loop's many concurrent episodes still share forward passes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rollout.engine import EngineSpec, Generation, SamplingConfig


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingConfig
    future: asyncio.Future


class HFEngine:
    name = "transformers"

    def __init__(self, spec: EngineSpec):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            spec.dtype, torch.float32
        )
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype).eval()
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.eos_id = self.tokenizer.eos_token_id
        self.max_batch = spec.max_num_seqs
        self.version = 0
        self._pending: list[_Request] = []
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._group = None

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, request_id: str) -> Generation:
        if self._runner is None:
            self._wakeup = asyncio.Event()
            self._runner = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(list(prompt_ids), sampling, future))
        self._wakeup.set()
        return await future

    async def _serve(self) -> None:
        while True:
            await self._wakeup.wait()
            # A short pause lets the other episodes of this step queue up behind the first one.
            await asyncio.sleep(0.005)
            self._wakeup.clear()
            while self._pending:
                batch = self._take_batch()
                version = self.version
                async with self._lock:
                    try:
                        results = await asyncio.to_thread(self._generate_batch, batch)
                    except Exception as e:  # surface to every waiting episode, keep serving
                        for r in batch:
                            if not r.future.done():
                                r.future.set_exception(e)
                        continue
                for r, (ids, logps, reason) in zip(batch, results):
                    if not r.future.done():
                        r.future.set_result(Generation(ids, logps, reason, version, self.version))

    def _take_batch(self) -> list[_Request]:
        # Same sampling settings per batch: generate() takes one temperature.
        first = self._pending[0].sampling
        batch = [
            r for r in self._pending if (r.sampling.temperature, r.sampling.top_p) == (first.temperature, first.top_p)
        ]
        batch = batch[: self.max_batch]
        taken = {id(r) for r in batch}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    def _generate_batch(self, batch: list[_Request]) -> list[tuple[list[int], list[float], str]]:
        torch = self._torch
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        sampling = batch[0].sampling
        greedy = sampling.temperature <= 1e-5
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(r.sampling.max_tokens for r in batch),
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
            )
        new = out.sequences[:, width:]
        # Processed scores (after temperature) give the logprobs of the distribution sampled from.
        logps = torch.stack([s.float().log_softmax(-1) for s in out.scores], dim=1)
        results = []
        for i, r in enumerate(batch):
            row = new[i].tolist()
            take, reason = len(row), "length"
            for j, tok in enumerate(row):
                if tok == self.eos_id:
                    take, reason = j + 1, "stop"
                    break
            if take > r.sampling.max_tokens:
                take, reason = r.sampling.max_tokens, "length"
            row = row[:take]
            lp = [float(logps[i, j, tok]) for j, tok in enumerate(row)]
            results.append((row, lp, reason))
        return results

    async def load_weights(self, path: str, version: int) -> None:
        from safetensors.torch import load_file

        async with self._lock:
            weights = load_file(path)
            self.model.load_state_dict(weights, strict=False)
            self.version = version

    async def join_weight_group(self, init_info: dict) -> None:
        from rollout.weight_wire import GroupAddress, join_group

        if self._group is not None:
            self._group.shutdown()
        self._group = await asyncio.to_thread(join_group, GroupAddress(**init_info))

    async def receive_weights(self, updates: list[dict], version: int) -> None:
        """The gloo transport's receive side, applied between generation batches (under the lock).
        `updates`: the gloo transport's payloads, each a whole UpdatePlan (rollout/weight_transport.py)."""
        from rollout.weight_wire import UpdatePlan, receive

        def load():
            for plan in updates:
                for bucket in receive(self._group, UpdatePlan(**plan)):
                    self.model.load_state_dict(dict(bucket), strict=False)

        async with self._lock:
            await asyncio.to_thread(load)
            self.version = version

    async def shutdown(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
