"""vLLM's weight-transfer protocol over the project's gloo wire (rollout/weight_wire.py), for CPUs and CI.

vLLM 0.32 drives pluggable engines through `AsyncLLM.init_weight_transfer_engine`,
`start_weight_update`, `update_weights` and `finish_weight_update`; its own `nccl` engine needs
CUDA. This one speaks the same protocol where there is none: registered with
`WeightTransferEngineFactory` under `rapo_gloo`, created by vLLM's worker inside the engine-core
process (the registration runs there because vLLM imports the worker extension module,
rollout/vllm_worker_ext.py, before it loads the model), and it loads what it receives with the
model's own `load_weights` inside vLLM's layerwise-reload lifecycle, which redoes the CPU
backend's weight repacking and maps stacked parameters (qkv, gate_up) as a checkpoint load does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from rollout.weight_wire import BACKEND, GroupAddress, UpdatePlan, join_group, receive


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank: int
    world_size: int
    timeout_s: float = 120.0
    shm_tag: str = ""  # the learner's offer of shared memory (on its node): rollout/weight_wire.py


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_sizes: list[int] = field(default_factory=list)


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        # Joining again (the group was re-formed after a worker joined or left) replaces the old one.
        self.shutdown()
        self.group = join_group(GroupAddress(init_info.master_address, init_info.master_port, init_info.rank,
                                             init_info.world_size, init_info.timeout_s, init_info.shm_tag))

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises where there is no
        # accelerator; a bucket has arrived (mapped, or broadcast) when receive() yields it.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("rapo_gloo weight transfer not initialised: call init_weight_transfer_engine first")
        plan = UpdatePlan(update_info.names, update_info.dtype_names, update_info.shapes, update_info.bucket_sizes)
        for bucket in receive(self.group, plan):
            self.model.load_weights(bucket)

    def shutdown(self) -> None:
        if self.group is not None:
            # A group whose peers died may not shut down cleanly; it is dropped anyway.
            with contextlib.suppress(Exception):
                self.group.shutdown()
            self.group = None


def register() -> None:
    """Make `rapo_gloo` a backend vLLM's factory can create (idempotent, per process)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
