"""The durable hand-off between group assembly and the learner: a Redis Stream with a consumer group.

An entry is one scored group. The learner reads entries as a consumer of the group and
acknowledges (and deletes) them only once the step that used them is done, so a learner
that dies mid-step leaves its entries pending, to be claimed again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from learner.groups import ScoredGroup
from rollout.types import Trajectory

CONSUMER_GROUP = "learner"


def encode_group(group: ScoredGroup) -> dict[bytes, bytes]:
    """A stream entry: the group's fields, its members' metadata as one JSON array, and each of the three
    token arrays of all members concatenated (per-member lengths in ``lens``): 11 fields whatever the
    group's size. (Four fields per member made every XADD and XREADGROUP carry 4n more values, whose
    packing and parsing were a large part of the controller's work per group.)"""
    wires = [member.to_wire() for member in group.members]
    lens = [(len(w["ids"]) // 4, len(w["mask"]), len(w["logp"]) // 4) for w in wires]
    return {
        b"qid": group.question_id.encode(), b"n": str(len(group.members)).encode(),
        b"gid": group.group_id.encode(), b"epoch": str(group.epoch).encode(),
        b"generate_s": repr(group.generate_s).encode(), b"reward_s": repr(group.reward_s).encode(),
        b"metas": b"[" + b",".join(w["meta"] for w in wires) + b"]",
        b"lens": np.array(lens, dtype=np.int64).tobytes(),
        b"ids": b"".join(w["ids"] for w in wires),
        b"mask": b"".join(w["mask"] for w in wires),
        b"logp": b"".join(w["logp"] for w in wires),
    }


def decode_group(fields: dict[bytes, bytes]) -> ScoredGroup:
    n = int(fields[b"n"])
    members = _members(fields, n) if b"metas" in fields else _members_per_field(fields, n)
    return ScoredGroup(
        fields[b"qid"].decode(), members, fields.get(b"gid", b"").decode(), int(fields.get(b"epoch", b"0")),
        generate_s=float(fields.get(b"generate_s", b"0")), reward_s=float(fields.get(b"reward_s", b"0")),
    )


def _members(fields: dict[bytes, bytes], n: int) -> list[Trajectory]:
    metas = json.loads(fields[b"metas"])
    lens = np.frombuffer(fields[b"lens"], dtype=np.int64).reshape(n, 3)
    ids, mask, logp = (memoryview(fields[k]) for k in (b"ids", b"mask", b"logp"))
    ends = np.cumsum(lens, axis=0) * (4, 1, 4)  # byte offsets: int32, uint8, float32
    starts = ends - lens * (4, 1, 4)
    return [
        Trajectory.from_parts(meta, ids[a[0] : b[0]], mask[a[1] : b[1]], logp[a[2] : b[2]])
        for meta, a, b in zip(metas, starts.tolist(), ends.tolist())
    ]


def _members_per_field(fields: dict[bytes, bytes], n: int) -> list[Trajectory]:
    """Entries written before the 11-field format (``{i}:meta``, ``{i}:ids``, ... per member), which a
    run resumed across the change may still hold in its stream."""
    members = []
    for i in range(n):
        prefix = f"{i}:".encode()
        members.append(Trajectory.from_wire({k[len(prefix) :]: v for k, v in fields.items() if k.startswith(prefix)}))
    return members


class GroupStream:
    def __init__(self, redis, namespace: str, consumer: str = "learner-0"):
        self.redis = redis
        self.key = f"{namespace}:groups"
        self.published_key = f"{namespace}:groups:published"
        self.consumer = consumer

    async def ensure(self) -> None:
        from redis.exceptions import ResponseError

        try:
            await self.redis.xgroup_create(self.key, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def publish(self, group: ScoredGroup, along: Sequence[Callable[[Any], object]] = ()) -> str:
        """Append the group; its id joins the published set in the same transaction (MULTI/EXEC), and so
        do the commands each of ``along`` queues on the pipeline it is given (the group's RAPO bookkeeping):
        one round trip for all of it, run together with nothing else in between."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for queue in along:
                queue(pipe)
            at = len(pipe)
            pipe.xadd(self.key, encode_group(group))
            if group.group_id:
                pipe.sadd(self.published_key, group.group_id)
            replies = await pipe.execute()
        return _id(replies[at])

    async def was_published(self, group_ids: list[str]) -> list[bool]:
        if not group_ids:
            return []
        return [bool(x) for x in await self.redis.smismember(self.published_key, group_ids)]

    async def read(self, count: int, block_ms: int = 1000) -> list[tuple[str, ScoredGroup]]:
        """Up to ``count`` new entries for this consumer (waits up to ``block_ms`` for the first)."""
        reply = await self.redis.xreadgroup(CONSUMER_GROUP, self.consumer, {self.key: ">"}, count=count, block=block_ms)
        return [(_id(eid), decode_group(fields)) for _, entries in reply or [] for eid, fields in entries]

    async def pending(self, count: int = 1000, after: str = "0") -> list[tuple[str, ScoredGroup]]:
        """Entries delivered to this consumer but not acknowledged, oldest first, after entry ``after``.

        After a learner restart these are the groups of the steps that were lost with it.
        """
        reply = await self.redis.xreadgroup(CONSUMER_GROUP, self.consumer, {self.key: after}, count=count)
        return [(_id(eid), decode_group(fields)) for _, entries in reply or [] for eid, fields in entries if fields]

    async def ack(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, CONSUMER_GROUP, *entry_ids)
            pipe.xdel(self.key, *entry_ids)
            await pipe.execute()

    async def depth(self) -> int:
        return int(await self.redis.xlen(self.key))


def _id(entry_id) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
