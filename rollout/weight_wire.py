"""The wire of the `gloo` weight transport: shared memory on the learner's node, one gloo broadcast beyond it.

Learner rank 0 is rank 0 of the group and hosts its TCPStore; every rollout engine is one more
rank. A policy version travels as a plan (names, dtypes, shapes, cut into buckets of about
`bucket_bytes`) sent once over Ray, then bucket by bucket as one flat byte buffer:

- receivers on the learner's node map it: the sender packs each bucket straight into a file in
  /dev/shm (one per bucket, kept for the group's life) and names it in the store, and every such
  receiver maps that file (no copy, as NCCL's shared-memory transport does inside a node);
- receivers elsewhere get it from one gloo broadcast among rank 0 and themselves.

Either way the sender writes each bucket once, whatever the number of receivers: it never sends
a copy per worker in turn. Who maps is settled when the group forms: a receiver the driver put on
the learner's node (`shm_tag` in its address) that also sees the sender's probe file in /dev/shm
(a container with /dev/shm of its own does not). Plain torch, so the same receive side runs inside
vLLM's engine process (the registered vLLM engine, rollout/vllm_weight_transfer.py), in the
transformers engine and in the benchmark.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

BACKEND = "rapo_gloo"
# Offsets inside a bucket are aligned so every tensor can be a zero-copy view of it.
ALIGN = 64
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "rapo-w-"
# Files of a sender that died (a killed learner) are removed by the next sender on the node: at
# once when they are of its own run, else once they are this old as well (remove_stale_segments).
STALE_SHM_S = 600.0


@dataclass(frozen=True)
class GroupAddress:
    """How a receiver joins the group: the sender's store, its rank, the group size, a timeout."""

    master_address: str
    master_port: int
    rank: int
    world_size: int
    timeout_s: float = 120.0
    # The sender's offer of shared memory (its probe file's tag), given to receivers on its node; "" for none.
    shm_tag: str = ""

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


def offer_shared_memory(nbytes: int, shm_dir: Path = SHM_DIR, run: str = "") -> str:
    """The sender's side: a tag for a group whose receivers on this node may map buckets from shm_dir,
    or "" where there is no such directory or too little room in it for a version (it holds a
    version's buckets for the group's life). `run` names the run (letters and digits kept): its
    own dead senders' files are removed at once, other runs' only once they are old."""
    if not shm_dir.is_dir():
        return ""
    run = "".join(c for c in run if c.isalnum())[:24] or "run"
    remove_stale_segments(shm_dir, run)
    if shutil.disk_usage(shm_dir).free < 1.25 * nbytes + (64 << 20):
        return ""
    tag = f"{os.getpid()}-{run}-{secrets.token_hex(6)}"
    probe_path(tag, shm_dir).write_text(tag)
    return tag


def probe_path(tag: str, shm_dir: Path = SHM_DIR) -> Path:
    """The file that offers a group's shared memory: a receiver that can read it shares the sender's /dev/shm."""
    return shm_dir / f"{SHM_PREFIX}{tag}.probe"


def remove_stale_segments(shm_dir: Path = SHM_DIR, run: str = "", min_age_s: float = STALE_SHM_S) -> int:
    """Remove what senders that died left in shm_dir (a killed learner cannot): files whose sender's
    pid is gone, and that belong to `run` or are older than min_age_s (a pid from another pid
    namespace sharing this /dev/shm would look gone: its files are spared while it may be writing)."""
    removed = 0
    for path in shm_dir.glob(f"{SHM_PREFIX}*"):
        pid, _, rest = path.name[len(SHM_PREFIX):].partition("-")
        try:
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if rest.split("-", 1)[0] != run and time.time() - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed += 1
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class WeightGroup:
    """One member's handle on a weight group: the gloo group of every member, and how buckets reach it.

    `remote` is the gloo group buckets are broadcast in: rank 0 and the receivers that do not map
    (the whole group when none map; None for a receiver that maps, or a sender whom every
    receiver maps). `local_receivers` (the sender's) counts the receivers that map; `maps` says
    whether this receiver does.

    The sender keeps one shared-memory file per bucket index for the group's life, mapped once
    (prefaulted), and rewrites it each push: a fresh file per bucket and push costs more in the
    kernel (allocating, zeroing and faulting in every page) than the cast itself, and so would a
    fresh mapping per push on every receiver. Receivers keep theirs too, read-only: what they are
    given holds its values until the push has ended, so a loader copies it in (vLLM's and the
    transformers engine's do; one that wrote into it would fault, not corrupt the others'). A
    push ends (finish_push) only once every receiver here has finished it, so no file is rewritten
    while one still reads it.
    """

    pg: dist.ProcessGroup
    rank: int
    store: dist.Store
    timeout_s: float
    tag: str = ""
    remote: dist.ProcessGroup | None = None
    local_receivers: int = 0
    maps: bool = False
    shm_dir: Path = SHM_DIR
    pushes: int = 0
    # Mapped files by bucket index: the sender's (writable) or this receiver's (read-only).
    _files: dict[int, tuple[Path, int, torch.Tensor]] = field(default_factory=dict)
    _sent: int = 0  # buckets sent in this push

    def barrier(self):
        return self.pg.barrier()

    # -- the sender's side --
    def bucket_buffer(self, size: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """Where the sender packs the next bucket: its shared-memory file when receivers map it."""
        if not self.local_receivers:
            return flat_buffer(size, scratch)
        # No receiver here still reads the file about to be rewritten: the last push ended once all had it.
        index = self._sent
        held = self._files.get(index)
        if held is None or held[1] != size:
            path = self.shm_dir / f"{SHM_PREFIX}{self.tag}-{index}"
            self._files[index] = (path, size, _map(path, size, create=True))
        return self._files[index][2]

    def send(self, buffer: torch.Tensor) -> None:
        if self.local_receivers:
            # Named before the broadcast, so the receivers here load it while the others receive it.
            path, size, _ = self._files[self._sent]
            self.store.set(self._key(self._sent), f"{size}:{path}")
        self._sent += 1
        if self.remote is not None:
            self.remote.broadcast(buffer, 0).wait()

    def finish_push(self) -> None:
        """After a version's last bucket: returns once every receiver here holds the whole version."""
        try:
            if self.local_receivers:
                self._wait_done(self.pushes)
                # Every receiver here has read this push's names: the store need not keep them.
                for key in [*(self._key(i) for i in range(self._sent)), f"done/{self.pushes}"]:
                    self.store.delete_key(key)
        finally:
            self.pushes += 1
            self._sent = 0

    def _wait_done(self, push: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        key = f"done/{push}"
        while (done := self.store.add(key, 0)) < self.local_receivers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight push: {self.local_receivers - done} of {self.local_receivers} receivers on "
                                   f"the learner's node did not take push {push} within {self.timeout_s:.0f} s")
            time.sleep(0.001)

    # -- a receiver's side --
    def map_bucket(self, index: int, size: int) -> torch.Tensor:
        key = self._key(index)
        self.store.wait([key], timedelta(seconds=self.timeout_s))
        sent_size, path = self.store.get(key).decode().split(":", 1)
        if int(sent_size) != size:
            raise RuntimeError(f"weight push: bucket {index} is {sent_size} bytes in shared memory, the plan {size}")
        held = self._files.get(index)
        if held is None or held[:2] != (Path(path), size):
            self._files[index] = (Path(path), size, _map(Path(path), size, create=False))
        return self._files[index][2]

    def finish_receive(self) -> None:
        if self.maps:
            self.store.add(f"done/{self.pushes}", 1)
        self.pushes += 1

    def _key(self, index: int) -> str:
        return f"bucket/{self.pushes}/{index}"

    def shutdown(self) -> None:
        # The files first: shutting down a group whose peers died may raise.
        self._files.clear()
        if self.rank == 0 and self.tag:
            for path in self.shm_dir.glob(f"{SHM_PREFIX}{self.tag}*"):
                path.unlink(missing_ok=True)
        for group in {id(g): g for g in (self.remote, self.pg) if g is not None}.values():
            group.shutdown()


# madvise(MADV_POPULATE_READ), Linux 5.14+: faults a mapping's pages in for reading in one call.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _map(path: Path, size: int, create: bool) -> torch.Tensor:
    """A file of `size` bytes mapped as a uint8 tensor, its pages faulted in up front.

    Both are shared mappings of the file, the receivers' read-only: a later push's bytes show
    through them without mapping again.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o600)
    try:
        if create:
            try:
                # Reserved up front: a write into a tmpfs that has run out of room is a SIGBUS, not an error.
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                path.unlink(missing_ok=True)
                raise RuntimeError(
                    f"weight push: no room in {path.parent} for a {size / 2**20:.0f} MB bucket ({e.strerror}); give "
                    "the machine (or container) more shared memory, or set weights.local_shm=false") from None
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        else:
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            with contextlib.suppress(OSError, ValueError):  # an older kernel: pages fault in as they are read
                mapped.madvise(MADV_POPULATE_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer's note on read-only buffers: intended here
        return torch.frombuffer(mapped, dtype=torch.uint8)


def join_group(address: GroupAddress, store: dist.TCPStore | None = None, shm_dir: Path = SHM_DIR) -> WeightGroup:
    """This process's handle on the group; blocks until every rank has joined (or the timeout).

    Groups of its own, not torch.distributed's default one: vLLM's worker and DeepSpeed's ranks
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
    rank, world = address.rank, address.world_size
    pg = dist.ProcessGroupGloo(dist.PrefixStore("rapo-weights", store), rank, world, opts)
    # Who maps: every receiver says, every member reads all (the same answer everywhere).
    maps = rank > 0 and bool(address.shm_tag) and _sees_probe(shm_dir, address.shm_tag)
    if rank > 0:
        store.set(f"maps/{rank}", "1" if maps else "0")
    keys = [f"maps/{r}" for r in range(1, world)]
    store.wait(keys, timeout)
    remote_ranks = [r for r, k in zip(range(1, world), keys) if store.get(k) == b"0"]
    local = world - 1 - len(remote_ranks)
    remote = None
    if not local:
        remote = pg
    elif remote_ranks and (rank == 0 or rank in remote_ranks):
        members = [0, *remote_ranks]
        remote = dist.ProcessGroupGloo(dist.PrefixStore("rapo-weights-remote", store), members.index(rank),
                                       len(members), opts)
    return WeightGroup(pg, rank, store, address.timeout_s, tag=address.shm_tag if rank == 0 else "",
                       remote=remote, local_receivers=local if rank == 0 else 0, maps=maps, shm_dir=shm_dir)


def _sees_probe(shm_dir: Path, tag: str) -> bool:
    try:
        return probe_path(tag, shm_dir).read_text() == tag
    except OSError:
        return False


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


def flat_buffer(size: int, scratch: torch.Tensor | None) -> torch.Tensor:
    """A bucket's flat buffer in process memory: the front of the reused scratch buffer, or a new one."""
    return torch.empty(size, dtype=torch.uint8) if scratch is None else scratch[:size]


def send_bucket(group: WeightGroup | dist.ProcessGroup, bucket: list[tuple[str, torch.dtype, list[int]]],
                tensors: list[torch.Tensor], scratch: torch.Tensor | None = None) -> None:
    """Cast and pack one bucket into a flat buffer (one copy), and send it: to a weight group (mapped
    on this node, broadcast beyond), or broadcast in a plain process group."""
    _, size = layout(bucket)
    buffer = group.bucket_buffer(size, scratch) if isinstance(group, WeightGroup) else flat_buffer(size, scratch)
    for view, tensor in zip(views(buffer, bucket), tensors):
        view.copy_(tensor.detach().reshape(view.shape))
    if isinstance(group, WeightGroup):
        group.send(buffer)
    else:
        broadcast_bucket(group, buffer)


def receive(group: WeightGroup, plan: UpdatePlan) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receivers' side: each bucket's (name, tensor) pairs, views of a buffer that is the
    sender's shared-memory file mapped here, or filled by the group's broadcast.

    A fresh buffer per bucket: a loader may hold on to what it was given until a layer is complete.
    """
    for index, bucket in enumerate(plan.buckets()):
        _, size = layout(bucket)
        if group.maps:
            buffer = group.map_bucket(index, size)
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
            broadcast_bucket(group.remote, buffer)
        yield [(name, t) for (name, _, _), t in zip(bucket, views(buffer, bucket))]
    group.finish_receive()
