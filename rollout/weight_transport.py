"""What differs between the weight transports that form a group (weights.transport gloo / nccl).

Everything else is shared: the bucket plan (rollout/weight_wire.py: UpdatePlan), the learner's
bucket-by-bucket gather and cast (learner/weight_stream.py), the forming of the group and the
push with its named failures (actors/weight_sync.py: WeightBroadcaster), and the receivers' side
of vLLM's weight-transfer protocol (rollout/vllm_engine.py: start_weight_update, one
update_weights per payload, finish_weight_update). A transport says:

- `backend`: the engine vLLM creates in each rollout worker (`weight_transfer_config`);
- `init_infos`: what each group member is given to join (`init_weight_transfer_engine`), from the
  address `open` returned (with the node learner rank 0 is on) and each member's node;
- `update_infos`: one version's `update_weights` payloads, in order;
- on learner rank 0 (rank 0 of the group): `open` (returns the rendezvous address), `join`
  (blocks until every member has joined), `sender` (sends one bucket), `close`.

The driver builds a transport, passes it to learner rank 0 (over Ray, before it opens anything),
and keeps its own copy for the pure parts. Group ranks: learner rank 0 is 0, then each rollout
engine's own ranks (its vLLM world size, 1 unless it is split over GPUs) in member order.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from rollout.weight_wire import BACKEND as GLOO_BACKEND
from rollout.weight_wire import UpdatePlan

Bucket = list[tuple[str, Any, list[int]]]
SendBucket = Callable[[Bucket, list], None]


def rank_offsets(member_ranks: list[int]) -> tuple[list[int], int]:
    """Each member's first rank in the group (learner rank 0 holds rank 0), and the group size."""
    offsets, next_rank = [], 1
    for n in member_ranks:
        if n < 1:
            raise ValueError(f"a group member has {n} ranks")
        offsets.append(next_rank)
        next_rank += n
    return offsets, next_rank


@dataclass
class GlooTransport:
    """The project's `rapo_gloo` engine (rollout/vllm_weight_transfer.py): CPUs, CI, GPUs too.

    With `local_shm`, receivers on learner rank 0's node map each bucket from shared memory and
    only the others take part in the gloo broadcast (rollout/weight_wire.py).
    """

    name: ClassVar[str] = "gloo"
    backend: ClassVar[str] = GLOO_BACKEND

    bucket_bytes: int
    local_shm: bool = True
    # A version's bytes in the rollout dtype, set by the driver before open: shared memory is
    # offered only where it has room for them.
    version_bytes: int = 0
    # The run's name (its Ray namespace), set by learner rank 0: its own dead senders' shared-memory
    # files are removed when it opens a group.
    run: str = ""
    # Learner rank 0's side, set by open/join (never pickled with anything in it: the driver
    # hands the transport over before open).
    group: Any = field(default=None, repr=False)
    _store: Any = field(default=None, repr=False)
    _address: Any = field(default=None, repr=False)

    def init_infos(self, address: dict, member_ranks: list[int], member_nodes: list[str] | None = None) -> list[dict]:
        """`member_nodes`: each member's node id; without them every member may map (the probe decides)."""
        if any(n != 1 for n in member_ranks):
            raise ValueError("the gloo transport takes one rank per rollout engine (no tensor-parallel engines)")
        address = dict(address)
        node = address.pop("node_id", None)
        tag = address.pop("shm_tag", "")
        offsets, world_size = rank_offsets(member_ranks)
        nodes = member_nodes or [node] * len(member_ranks)
        return [{**address, "rank": r, "world_size": world_size, "shm_tag": tag if n == node else ""}
                for r, n in zip(offsets, nodes)]

    def update_infos(self, plan: UpdatePlan) -> list[dict]:
        # The whole plan in one update_weights call; the engine receives it bucket by bucket.
        return [asdict(plan)]

    def open(self, host: str, world_size: int, timeout_s: float) -> dict:
        from rollout.weight_wire import GroupAddress, offer_shared_memory, open_store

        self.close()
        self._store = open_store(host, timeout_s)
        tag = offer_shared_memory(self.version_bytes, run=self.run) if self.local_shm else ""
        self._address = GroupAddress(host, self._store.port, 0, world_size, timeout_s, tag)
        return asdict(self._address)

    def join(self) -> None:
        from rollout.weight_wire import join_group

        self.group = join_group(self._address, self._store)

    def sender(self, plan: UpdatePlan) -> SendBucket:
        from rollout.weight_wire import send_bucket, send_buffer

        scratch = None if self.group.local_receivers else send_buffer(plan)  # shared memory: a file a bucket
        last = len(plan.bucket_sizes)
        sent = 0

        def send(bucket: Bucket, tensors: list) -> None:
            nonlocal sent
            send_bucket(self.group, bucket, tensors, scratch)
            sent += 1
            if sent == last:
                self.group.finish_push()

        return send

    def close(self) -> None:
        if self.group is not None:
            with contextlib.suppress(Exception):  # peers that died leave nothing to shut down cleanly
                self.group.shutdown()
        elif self._address is not None and self._address.shm_tag:
            from rollout.weight_wire import probe_path

            # Opened but never joined: its probe file is all there is.
            probe_path(self._address.shm_tag).unlink(missing_ok=True)
        self.group = None
        self._address = None


@dataclass
class NCCLTransport:
    """vLLM's own `nccl` engine (vllm.distributed.weight_transfer.nccl_engine), GPUs only.

    The receivers are vLLM's NCCLWeightTransferEngine, unchanged. Learner rank 0 opens its end with
    vLLM's trainer helper (nccl_common.trainer_init: a StatelessProcessGroup rendezvous, then a
    PyNcclCommunicator as rank 0) and sends each bucket with vLLM's packed producer
    (packed_tensor.packed_nccl_broadcast_producer), whose chunking the receivers' packed consumer
    repeats from the bucket's update info. The packed buffer is one bucket, so a bucket is one
    broadcast. vLLM's NCCLTrainerWeightTransferEngine is not used whole: it drives one engine
    (rank_offset 1) through a client from the trainer process and streams the model in one pass,
    where here the driver drives every engine (and names the one that fails) and the learner
    gathers one bucket at a time under ZeRO-3.
    """

    name: ClassVar[str] = "nccl"
    backend: ClassVar[str] = "nccl"
    num_buffers: ClassVar[int] = 2

    bucket_bytes: int
    group: Any = field(default=None, repr=False)
    device: Any = field(default=None, repr=False)  # rank 0's CUDA device, the communicator's
    _address: dict | None = field(default=None, repr=False)

    def init_infos(self, address: dict, member_ranks: list[int], member_nodes: list[str] | None = None) -> list[dict]:
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

        offsets, world_size = rank_offsets(member_ranks)
        return [
            worker_init_payload(NCCLWeightTransferInitInfo(
                master_address=address["master_address"], master_port=address["master_port"],
                rank_offset=offset, world_size=world_size, packed=True,
                packed_buffer_size_bytes=self.bucket_bytes, packed_num_buffers=self.num_buffers))
            for offset in offsets
        ]

    def update_infos(self, plan: UpdatePlan) -> list[dict]:
        # One update_weights per bucket: the learner gathers and sends a bucket at a time, and the
        # packed consumer must cut the stream where the producer does (at each bucket's end).
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

        out, start = [], 0
        for n in plan.bucket_sizes:
            rows = slice(start, start + n)
            info = NCCLWeightTransferUpdateInfo(names=plan.names[rows], dtype_names=plan.dtype_names[rows],
                                                shapes=[list(s) for s in plan.shapes[rows]])
            out.append(asdict(info))
            start += n
        return out

    def open(self, host: str, world_size: int, timeout_s: float) -> dict:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("weights.transport=nccl: learner rank 0 sees no CUDA device; use weights.transport=gloo")
        from vllm.utils.network_utils import get_open_port

        self.close()
        self.device = torch.device("cuda", torch.cuda.current_device())
        # vLLM's rendezvous binds this port when rank 0 joins (join), as in vLLM's RLHF examples.
        self._address = {"master_address": host, "master_port": get_open_port(), "world_size": world_size}
        return {"master_address": host, "master_port": self._address["master_port"]}

    def join(self) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.group = trainer_init(self._address, rank=0)

    def sender(self, plan: UpdatePlan) -> SendBucket:
        import torch
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        def send(bucket: Bucket, tensors: list) -> None:
            # Cast on the current stream and wait for it: the producer packs on streams of its own.
            pairs = [(name, t.detach().to(device=self.device, dtype=dtype))
                     for (name, dtype, _), t in zip(bucket, tensors)]
            torch.cuda.current_stream().synchronize()
            # It drains its streams before returning, so the gathered bucket may be freed after.
            with warnings.catch_warnings():
                # A parameter larger than a bucket travels alone, as planned; vLLM warns about each.
                warnings.filterwarnings("ignore", message=r"Tensor .* exceeds buffer_size_bytes")
                packed_nccl_broadcast_producer(iter(pairs), self.group, 0, lambda item: item[1],
                                               buffer_size_bytes=self.bucket_bytes, num_buffers=self.num_buffers)

        return send

    def close(self) -> None:
        if self.group is not None:
            with contextlib.suppress(Exception):
                self.group.destroy()
        self.group = None


TRANSPORTS = {t.name: t for t in (GlooTransport, NCCLTransport)}


def weight_transport(name: str, bucket_bytes: int, local_shm: bool = True) -> GlooTransport | NCCLTransport:
    return GlooTransport(bucket_bytes, local_shm) if name == "gloo" else TRANSPORTS[name](bucket_bytes)
