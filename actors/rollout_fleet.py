"""The rollout fleet: N RolloutWorker actors that run groups of episodes, kept alive and in sync.

The fleet deals each group (a question's n episodes) to the worker with the fewest groups in
flight. A worker that dies (Ray restarts it with the initial weights) is taken out of the
rotation, brought back to the current weights and put back; the groups it was running are
handed back to the caller to be run again. Workers can be added and removed while groups
run: a removed worker drains (finishes what it has) before it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from actors.rollout_worker import RolloutWorker
from actors.weight_sync import WeightBroadcaster, WeightPushFailed
from rollout.episodes import EpisodeRequest
from rollout.types import Trajectory
from rollout.weights import BroadcastRef, WeightRef

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker running a group died; the group must be run again."""


class WeightSyncTimeout(RuntimeError):
    pass


@dataclass
class WorkerSlot:
    name: str
    handle: object
    in_flight: int = 0
    ready: bool = False
    draining: bool = False
    restarts: int = 0
    # The policy version its engine holds (what a push or a catch-up gave it).
    version: int = 0
    busy_since: float | None = None
    busy_s: float = 0.0
    info: dict = field(default_factory=dict)

    def mark(self, delta: int) -> None:
        """Track busy time (at least one group in flight), for the idle-fraction metric."""
        now = time.monotonic()
        if self.in_flight == 0 and delta > 0:
            self.busy_since = now
        self.in_flight += delta
        if self.in_flight == 0 and self.busy_since is not None:
            self.busy_s += now - self.busy_since
            self.busy_since = None


class RolloutFleet:
    def __init__(
        self,
        make_worker: Callable[[str], object],
        *,
        groups_per_worker: int,
        weight_sync_timeout_s: float = 300,
        start_timeout_s: float = 600,
        broadcaster: WeightBroadcaster | None = None,
    ):
        self.make_worker = make_worker
        # weights.transport gloo / nccl: versions are broadcast; None: each worker loads a file.
        self.broadcaster = broadcaster
        self.start_timeout_s = start_timeout_s
        self.groups_per_worker = groups_per_worker
        self.weight_sync_timeout_s = weight_sync_timeout_s
        self.slots: dict[str, WorkerSlot] = {}
        self.next_index = 0
        self.current: WeightRef | BroadcastRef | None = None
        self.changed = asyncio.Condition()
        self.restarts = 0

    # ---- membership -------------------------------------------------------------------------
    def _new_slot(self) -> WorkerSlot:
        name = f"rollout-{self.next_index}"
        self.next_index += 1
        slot = WorkerSlot(name, self.make_worker(name))
        self.slots[name] = slot
        return slot

    async def start(self, n: int) -> list[dict]:
        slots = [self._new_slot() for _ in range(n)]
        return list(await asyncio.gather(*(self._bring_up(s) for s in slots)))

    async def _bring_up(self, slot: WorkerSlot) -> dict:
        """Wait until the actor answers, give it the current weights, put it in the rotation."""
        try:
            slot.info = await asyncio.wait_for(slot.handle.info.remote(), self.start_timeout_s)
        except TimeoutError:
            self.slots.pop(slot.name, None)
            ray.kill(slot.handle)
            raise RuntimeError(
                f"{slot.name} did not start within {self.start_timeout_s:.0f} s: the cluster may lack the resources "
                "it asks for (rollout.num_cpus_per_worker / num_gpus_per_worker)"
            ) from None
        if self.current is not None and slot.info.get("version") != self.current.version:
            await self._load(slot, self.current)
        slot.version = self.current.version if self.current is not None else slot.info.get("version", 0)
        slot.ready = True
        async with self.changed:
            self.changed.notify_all()
        return slot.info

    async def scale(self, n: int) -> dict:
        """Grow to or shrink to n live workers; new ones start with the current weights."""
        live = [s for s in self.slots.values() if not s.draining]
        added, removed = [], []
        if n > len(live):
            new = [self._new_slot() for _ in range(n - len(live))]
            await asyncio.gather(*(self._bring_up(s) for s in new))
            added = [s.name for s in new]
        elif n < len(live):
            # Newest first; each finishes the groups it is running, then stops.
            for slot in sorted(live, key=lambda s: int(s.name.split("-")[1]))[n - len(live) :]:
                slot.draining = True
                removed.append(slot.name)
                asyncio.ensure_future(self._retire(slot))
        return {
            "added": added,
            "draining": removed,
            "workers": n,
            "versions": {s.name: s.version for s in self.slots.values()},
            "current_version": self.current.version if self.current is not None else 0,
        }

    async def _retire(self, slot: WorkerSlot) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: slot.in_flight == 0)
        # Never in the middle of a push: the weight group would lose a member mid-broadcast.
        async with self.broadcaster.lock if self.broadcaster is not None else contextlib.nullcontext():
            self.slots.pop(slot.name, None)
        with contextlib.suppress(Exception):  # stopping anyway
            await asyncio.wait_for(slot.handle.shutdown.remote(), 30)
        ray.kill(slot.handle)

    @property
    def size(self) -> int:
        return sum(1 for s in self.slots.values() if not s.draining)

    # ---- running groups -----------------------------------------------------------------------
    async def _acquire(self) -> WorkerSlot:
        def free():
            ready = [
                s for s in self.slots.values() if s.ready and not s.draining and s.in_flight < self.groups_per_worker
            ]
            return min(ready, key=lambda s: (s.in_flight, s.name)) if ready else None

        async with self.changed:
            await self.changed.wait_for(lambda: free() is not None)
            slot = free()
            slot.mark(+1)
            return slot

    async def has_capacity(self) -> bool:
        return any(s.ready and not s.draining and s.in_flight < self.groups_per_worker for s in self.slots.values())

    async def run_group(self, requests: list[EpisodeRequest], tag: str) -> list[Trajectory]:
        """Run one group on some worker; WorkerLost if that worker died meanwhile."""
        slot = await self._acquire()
        try:
            return await slot.handle.rollout.remote(requests, tag)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self._worker_lost(slot, e)
            raise WorkerLost(slot.name) from e
        finally:
            async with self.changed:
                slot.mark(-1)
                self.changed.notify_all()

    def _worker_lost(self, slot: WorkerSlot, error: BaseException) -> None:
        """Take a dead worker out of the rotation (once) and bring it back in the background."""
        if not slot.ready:
            return
        slot.ready = False
        slot.restarts += 1
        self.restarts += 1
        log.warning("%s died (%s); bringing it back", slot.name, type(error).__name__)
        asyncio.ensure_future(self._recover(slot))

    async def _recover(self, slot: WorkerSlot) -> None:
        # Ray restarts the actor (max_restarts); its engine starts from the initial weights.
        for attempt in range(60):
            try:
                await self._bring_up(slot)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
        log.error("%s did not come back; replacing it", slot.name)
        self.slots.pop(slot.name, None)
        await self._bring_up(self._new_slot())

    async def run_everywhere(self, requests: list[EpisodeRequest], tag: str) -> list[Trajectory]:
        """Spread a batch (e.g. an evaluation) over the fleet in groups of one worker's share."""
        n = max(1, self.size)
        shares = [requests[i::n] for i in range(n)]
        results = await asyncio.gather(*(self._run_retrying(s, tag) for s in shares if s))
        return [t for part in results for t in part]

    async def _run_retrying(self, requests: list[EpisodeRequest], tag: str) -> list[Trajectory]:
        while True:
            try:
                return await self.run_group(requests, tag)
            except WorkerLost:
                continue

    # ---- weights --------------------------------------------------------------------------------
    async def _load(self, slot: WorkerSlot, ref: WeightRef | BroadcastRef) -> float:
        if isinstance(ref, BroadcastRef):
            return await self._catch_up(slot)
        try:
            seconds = await asyncio.wait_for(slot.handle.load_weights.remote(ref), self.weight_sync_timeout_s)
            slot.version = ref.version
            return seconds
        except TimeoutError:
            raise WeightSyncTimeout(
                f"{slot.name} did not load weights v{ref.version} within {self.weight_sync_timeout_s:.0f} s "
                f"(node {slot.info.get('host')}, pid {slot.info.get('pid')})"
            ) from None

    async def _catch_up(self, slot: WorkerSlot) -> float:
        """A worker that missed versions (restarted, or new) gets the current one before it takes work."""
        t0 = time.perf_counter()
        async with self.broadcaster.lock:
            # Under the lock the learner holds exactly `current` (a train step would hold the lock).
            try:
                await self.broadcaster.push(self.current.version, [slot])
            except WeightPushFailed as e:
                raise WeightSyncTimeout(f"{slot.name} did not get weights v{self.current.version}: {e}") from None
            slot.version = self.current.version
        return time.perf_counter() - t0

    async def _broadcast(self, ref: BroadcastRef) -> None:
        """One push to every ready worker; a worker that dies or stalls meanwhile is recovered, and the
        others get the version again through a group re-formed without it."""
        for attempt in range(2):
            slots = [s for s in self.slots.values() if s.ready]
            if not slots:
                return
            try:
                await self.broadcaster.push(ref.version, slots)
                for slot in slots:
                    slot.version = ref.version
                return
            except WeightPushFailed as e:
                log.warning("%s", e)
                for slot in slots:
                    if slot.name in e.dead + e.failed and slot.name in self.slots:
                        # Recovery brings it to the current version before it takes work again.
                        self._worker_lost(slot, e)
                if attempt == 1:
                    raise WeightSyncTimeout(str(e)) from None

    async def sync_weights(self, ref: WeightRef | BroadcastRef) -> float:
        """Push a version to every live worker; in-flight episodes continue under it."""
        self.current = ref
        t0 = time.perf_counter()
        if isinstance(ref, BroadcastRef):
            await self._broadcast(ref)
            return time.perf_counter() - t0
        slots = [s for s in self.slots.values() if s.ready]
        results = await asyncio.gather(*(self._load(s, ref) for s in slots), return_exceptions=True)
        for slot, r in zip(slots, results):
            if isinstance(r, WeightSyncTimeout):
                raise r
            if isinstance(r, BaseException):
                # Died between steps: it is recovered (and brought to `current`) in the background.
                self._worker_lost(slot, r)
        return time.perf_counter() - t0

    # ---- reporting -------------------------------------------------------------------------------
    def busy_seconds(self) -> dict[str, float]:
        now = time.monotonic()
        return {
            s.name: s.busy_s + (now - s.busy_since if s.busy_since is not None else 0.0) for s in self.slots.values()
        }

    def describe(self) -> list[dict]:
        return [
            {
                "name": s.name,
                "ready": s.ready,
                "version": s.version,
                "draining": s.draining,
                "in_flight": s.in_flight,
                "restarts": s.restarts,
                "pid": s.info.get("pid"),
                "node_id": s.info.get("node_id"),
                "engine": s.info.get("engine"),
            }
            for s in sorted(self.slots.values(), key=lambda s: s.name)
        ]

    async def shutdown(self) -> None:
        slots = list(self.slots.values())
        await asyncio.gather(*(asyncio.wait_for(s.handle.shutdown.remote(), 30) for s in slots), return_exceptions=True)
        for s in slots:
            ray.kill(s.handle)
        self.slots.clear()


def rollout_worker_factory(options: dict, args: tuple):
    """make_worker for the fleet: a restartable RolloutWorker named like the slot."""

    def make(name: str):
        return RolloutWorker.options(name=name, max_restarts=-1, max_task_retries=0, **options).remote(name, *args)

    return make
