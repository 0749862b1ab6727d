"""The wire of the `gloo` weight transport: one torch.distributed gloo group, one broadcast per bucket.

Learner rank 0 is rank 0 of the group and hosts its TCPStore; every rollout engine is one more
rank. A policy version travels as a plan (names, dtypes, shapes, cut into buckets of about
`bucket_bytes`) sent once over Ray, then as one broadcast of one flat byte buffer per bucket,
which every receiver gets from the same collective: the sender never sends a copy per worker in
turn. Plain torch, so the same receive side runs inside vLLM's engine process (the registered
vLLM engine, rollout/vllm_weight_transfer.py), in the transformers engine and in the benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

BACKEND = "rapo_gloo"
# Offsets inside a bucket are aligned so every tensor can be a zero-copy view of it.
ALIGN = 64


@dataclass(frozen=True)
class GroupAddress:
    """How a receiver joins the group: the sender's store, its rank, the group size, a timeout."""

    master_address: str
    master_port: int
    rank: int
    world_size: int
    timeout_s: float = 120.0

    def for_rank(self, rank: int) -> dict:
        return {**asdict(self), "rank": rank}


@dataclass
class UpdatePlan:
    """One version's parameters, in send order, and how many of them each bucket holds."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_sizes: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError("names, dtype_names and shapes must have one entry per parameter")
        if sum(self.bucket_sizes) != len(self.names):
            raise ValueError(f"buckets hold {sum(self.bucket_sizes)} parameters, the plan {len(self.names)}")

    def buckets(self) -> Iterator[list[tuple[str, torch.dtype, list[int]]]]:
        start = 0
        for n in self.bucket_sizes:
            rows = range(start, start + n)
            yield [(self.names[i], getattr(torch, self.dtype_names[i]), self.shapes[i]) for i in rows]
            start += n

    def nbytes(self) -> int:
        return sum(layout(bucket)[1] for bucket in self.buckets())


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(params: list[tuple[str, str, list[int]]], bucket_bytes: int) -> UpdatePlan:
    """Cut parameters (name, dtype name, shape), kept in order, into buckets of at most bucket_bytes.

    A parameter larger than a bucket gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    sizes: list[int] = []
    used = 0
    for _, dtype_name, shape in params:
        n = _aligned(_nbytes(getattr(torch, dtype_name), shape))
        if sizes and used + n <= bucket_bytes:
            sizes[-1] += 1
            used += n
        else:
            sizes.append(1)
            used = n
    return UpdatePlan([p[0] for p in params], [p[1] for p in params], [list(p[2]) for p in params], sizes)


def layout(bucket: list[tuple[str, torch.dtype, list[int]]]) -> tuple[list[int], int]:
    """Byte offsets of a bucket's tensors inside its flat buffer, and the buffer's size."""
    offsets, used = [], 0
    for _, dtype, shape in bucket:
        offsets.append(used)
        used += _aligned(_nbytes(dtype, shape))
    return offsets, used


def views(buffer: torch.Tensor, bucket: list[tuple[str, torch.dtype, list[int]]]) -> list[torch.Tensor]:
    """The bucket's tensors as views of its flat byte buffer."""
    offsets, _ = layout(bucket)
    return [
        buffer[off: off + _nbytes(dtype, shape)].view(dtype).view(shape)
        for off, (_, dtype, shape) in zip(offsets, bucket)
    ]


def open_store(host: str, timeout_s: float) -> dist.TCPStore:
    """The sender's side of the rendezvous: a TCPStore on a port the OS picks (no race for a free port)."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


def join_group(address: GroupAddress, store: dist.TCPStore | None = None) -> dist.ProcessGroup:
    """This process's handle on the group; blocks until every rank has joined (or the timeout).

    A group of its own, not torch.distributed's default one: vLLM's worker and DeepSpeed's ranks
    already own that.
    """
    timeout = timedelta(seconds=address.timeout_s)
    if store is None:
        store = dist.TCPStore(address.master_address, address.master_port, None, False, timeout)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # Rank 0 binds where the store listens; receivers on the host name Ray gave their node.
    host = address.master_address if address.rank == 0 else _own_address(address.master_address)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore("rapo-weights", store), address.rank, address.world_size, opts)


def _own_address(peer: str) -> str:
    """The local address that routes to the sender (what gloo must bind to reach it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def broadcast_bucket(group: dist.ProcessGroup, buffer: torch.Tensor) -> None:
    group.broadcast(buffer, 0).wait()


def send_buffer(plan: UpdatePlan, device: torch.device | str = "cpu") -> torch.Tensor:
    """One buffer the size of the plan's largest bucket, reused for every bucket: a fresh one per
    bucket costs more in page faults than the cast itself."""
    return torch.empty(max(layout(b)[1] for b in plan.buckets()), dtype=torch.uint8, device=device)


def send_bucket(group: dist.ProcessGroup, bucket: list[tuple[str, torch.dtype, list[int]]],
                tensors: list[torch.Tensor], scratch: torch.Tensor | None = None) -> None:
    """Cast and pack one bucket into a flat buffer (one copy), broadcast it."""
    _, size = layout(bucket)
    buffer = torch.empty(size, dtype=torch.uint8) if scratch is None else scratch[:size]
    for view, tensor in zip(views(buffer, bucket), tensors):
        view.copy_(tensor.detach().reshape(view.shape))
    broadcast_bucket(group, buffer)


def receive(group: dist.ProcessGroup, plan: UpdatePlan) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receivers' side: each bucket's (name, tensor) pairs, views of a buffer filled by one broadcast.

    A fresh buffer per bucket: a loader may hold on to what it was given until a layer is complete.
    """
    for bucket in plan.buckets():
        _, size = layout(bucket)
        buffer = torch.empty(size, dtype=torch.uint8)
        broadcast_bucket(group, buffer)
        yield [(name, t) for (name, _, _), t in zip(bucket, views(buffer, bucket))]
