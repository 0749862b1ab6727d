"""Pushing a policy version to the rollout engines through one weight group (weights.transport gloo / nccl).

The group is learner rank 0 plus every receiving engine's ranks; it is formed again whenever its
members change (a worker joined, left or was restarted). A push streams the learner's buckets while
every member receives them through vLLM's weight-transfer protocol. What differs between gloo and
nccl (the engine, the join and update payloads, rank 0's end) is the transport's
(rollout/weight_transport.py); this orchestration is the same for both. A member that dies or stalls during
a push fails it after the timeout, named; the fleet brings it back through recovery and pushes
again to the others in a group re-formed without it.

`lock` makes versions exact: the controller holds it from a train step to that step's push, and a
worker catching up (restarted, or added by `rapo scale`) takes it too, so the weights it receives
are always the published version it is told they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import ray

from rollout.weight_transport import weight_transport
from rollout.weight_wire import UpdatePlan

OP_TIMEOUT_S = 60.0


class WeightPushFailed(RuntimeError):
    def __init__(self, message: str, dead: list[str], failed: list[str]):
        super().__init__(message)
        self.dead = dead
        self.failed = failed


class WeightBroadcaster:
    def __init__(self, learner: Callable[[], object], *, transport: str, dtype: str, bucket_bytes: int,
                 timeout_s: float, local_shm: bool = True):
        self.learner = learner
        self.transport = weight_transport(transport, bucket_bytes, local_shm)
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.lock = asyncio.Lock()
        self.members: tuple | None = None
        self.plan: dict | None = None
        self.updates: list[dict] | None = None  # the plan as the transport's update_weights payloads
        self.groups_formed = 0
        # Over every group formed: members joined, and those that map buckets from shared memory.
        self.receivers_joined = 0
        self.receivers_mapped = 0
        self.bytes_sent = 0

    def reset(self) -> None:
        """The learner was replaced: its group is gone."""
        self.members = None

    async def push(self, version: int, slots: list) -> None:
        learner = self.learner()
        if self.plan is None:
            self.plan = await learner.weight_plan(self.dtype, self.bucket_bytes)
            plan = UpdatePlan(**self.plan)
            self.updates = self.transport.update_infos(plan)
            if hasattr(self.transport, "version_bytes"):
                self.transport.version_bytes = plan.nbytes()
        key = tuple((s.name, s.restarts, id(learner)) for s in slots)
        try:
            if key != self.members:
                self.members = None
                # An engine split over several GPUs holds that many ranks (its vLLM world size).
                ranks = [s.info.get("weight_ranks", 1) for s in slots]
                # Per collective (one bucket, one join), so shorter than the whole push may take: a member
                # that died frees the others soon, and their engines can take the next group's join.
                address = await self._learner(learner.open_weight_group(self.transport, sum(ranks) + 1,
                                                                        min(self.timeout_s, OP_TIMEOUT_S)),
                                              "open the weight group")
                # Receivers on learner rank 0's node (its node_id in the address) may map buckets from shared memory.
                infos = self.transport.init_infos(address, ranks, [s.info.get("node_id") for s in slots])
                joins = [s.handle.join_weight_group.remote(info) for s, info in zip(slots, infos)]
                mapped = await self._all(learner.join_weight_group(), joins, slots, "join the weight group")
                self.members = key
                self.groups_formed += 1
                self.receivers_joined += len(slots)
                self.receivers_mapped += mapped or 0
            sent = await self._all(learner.send_weights(self.plan),
                                   [s.handle.receive_weights.remote(self.updates, version) for s in slots],
                                   slots, f"receive weights v{version}")
            self.bytes_sent += sent or 0
        except BaseException:
            self.members = None
            raise

    async def _learner(self, call, what: str):
        """A learner-only call, bounded: a learner still blocked in a failed push (an NCCL broadcast
        has no op timeout) fails the push, named, instead of hanging it."""
        try:
            return await asyncio.wait_for(call, self.timeout_s + 30)
        except TimeoutError:
            raise WeightPushFailed(f"weight push: learner rank 0 did not {what} within {self.timeout_s + 30:.0f} s "
                                   "(still blocked in an earlier push?)", [], []) from None

    async def _all(self, sender, receivers: list, slots: list, what: str):
        tasks = [asyncio.ensure_future(sender)] + [asyncio.ensure_future(_wrap(r)) for r in receivers]
        # The group's own timeout fails every blocked member first; this one only bounds the RPCs.
        done, pending = await asyncio.wait(tasks, timeout=self.timeout_s + 30)
        for t in pending:
            t.cancel()
        dead, failed, causes = [], [], []
        for slot, t in zip(slots, tasks[1:]):
            error = t.exception() if t in done else TimeoutError("no answer")
            if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
                dead.append(slot.name)
            elif error is not None:
                failed.append(slot.name)
                causes.append(f"{slot.name}: {_cause(error)}")
        sender_error = tasks[0].exception() if tasks[0] in done else TimeoutError("no answer")
        if dead or failed or sender_error is not None:
            raise WeightPushFailed(
                f"weight push: {what} failed; died: {dead or 'none'}; failed or timed out after "
                f"{self.timeout_s:.0f} s: {'; '.join(causes) or 'none'}; "
                f"learner: {_cause(sender_error) if sender_error else 'ok'}", dead, failed)
        return tasks[0].result()


def _cause(error: BaseException) -> str:
    """The remote exception's own type and message (a RayTaskError wraps it in its traceback)."""
    inner = getattr(error, "cause", None) or error
    return f"{type(inner).__name__}: {str(inner).strip().splitlines()[-1] if str(inner).strip() else ''}"


async def _wrap(ref):
    return await ref
