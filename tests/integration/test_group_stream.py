"""The learner's durable hand-off on a real Redis server: publish, read, ack, pending after a crash."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from actors.redis_client import async_client
from learner.group_stream import GroupStream
from learner.groups import ScoredGroup
from rollout.types import ToolCall, Trajectory


def _group(qid: str, n: int = 3) -> ScoredGroup:
    members = [
        Trajectory(
            question_id=qid,
            sample_index=i,
            token_ids=[1, 2, 3 + i],
            loss_mask=[0, 1, 1],
            behaviour_logprobs=[0.0, -0.25, -1.5 - i],
            prompt_length=1,
            tool_calls=[ToolCall("search_urls", {"query": "q"}, urls=["https://a.example/x"])],
            reward=float(i == 0),
            correct=i == 0,
            answer="A" if i == 0 else None,
            policy_version_start=2,
            policy_version_end=3,
        )
        for i in range(n)
    ]
    return ScoredGroup(qid, members)


def _run(coro):
    return asyncio.run(coro)


def test_round_trip_keeps_every_field(redis_server):
    async def go():
        r = async_client(redis_server.url, redis_server.password)
        stream = GroupStream(r, f"t-{uuid.uuid4().hex}")
        await stream.ensure()
        sent = _group("q1")
        await stream.publish(sent)
        ((eid, got),) = await stream.read(10, block_ms=100)
        await r.aclose()
        return sent, got

    sent, got = _run(go())
    assert got.question_id == sent.question_id
    for a, b in zip(sent.members, got.members):
        # Decoded packed (numpy arrays of the wire types), as the learner takes them.
        assert (b.token_ids.dtype, b.loss_mask.dtype, b.behaviour_logprobs.dtype) == (np.int32, np.uint8, np.float32)
        assert b.token_ids.tolist() == a.token_ids and b.loss_mask.tolist() == a.loss_mask
        assert b.behaviour_logprobs.tolist() == a.behaviour_logprobs  # float32-exact values chosen
        assert (a.reward, a.correct, a.answer, a.policy_version_start) == (
            b.reward,
            b.correct,
            b.answer,
            b.policy_version_start,
        )
        assert b.tool_calls[0].urls == ["https://a.example/x"]


def test_unacked_entries_survive_a_consumer_restart_and_acked_ones_are_gone(redis_server):
    ns = f"t-{uuid.uuid4().hex}"

    async def first_consumer():
        r = async_client(redis_server.url, redis_server.password)
        stream = GroupStream(r, ns)
        await stream.ensure()
        for q in ("a", "b", "c"):
            await stream.publish(_group(q))
        got = await stream.read(2, block_ms=100)
        await stream.ack([got[0][0]])  # the step that used "a" finished; "b" was in flight
        await r.aclose()
        return [g.question_id for _, g in got]

    async def restarted_consumer():
        r = async_client(redis_server.url, redis_server.password)
        stream = GroupStream(r, ns)
        await stream.ensure()  # idempotent: the consumer group already exists
        pending = [g.question_id for _, g in await stream.pending()]
        fresh = [g.question_id for _, g in await stream.read(10, block_ms=100)]
        depth = await stream.depth()
        await r.aclose()
        return pending, fresh, depth

    assert _run(first_consumer()) == ["a", "b"]
    pending, fresh, depth = _run(restarted_consumer())
    assert pending == ["b"] and fresh == ["c"] and depth == 2


def test_packed_trajectories_publish_the_same_entries(redis_server):
    """Rollout workers return packed trajectories (numpy arrays): the stream must carry exactly what
    the list form carries, and the token counts must not wrap (a uint8 mask summed would, at 256)."""
    n = 700
    plain = Trajectory(
        "q",
        0,
        list(range(n)),
        [0] * 100 + [1] * (n - 100),
        [0.0] * 100 + [-0.5] * (n - 100),
        100,
        reward=1.0,
        correct=True,
        answer="A",
    )
    packed = Trajectory.from_wire(plain.to_wire()).pack()
    assert isinstance(packed.loss_mask, np.ndarray) and packed.generated_tokens == plain.generated_tokens == n - 100

    async def go():
        r = async_client(redis_server.url, redis_server.password)
        stream = GroupStream(r, f"t-{uuid.uuid4().hex}")
        await stream.ensure()
        for t in (plain, packed):
            await stream.publish(ScoredGroup("q", [t, t]))
        got = await stream.read(10, block_ms=100)
        await r.aclose()
        return [g for _, g in got]

    from_plain, from_packed = _run(go())
    assert plain.to_wire() == packed.to_wire()
    for a, b in zip(from_plain.members, from_packed.members):
        assert a.token_ids.tolist() == b.token_ids.tolist() == plain.token_ids
        assert a.loss_mask.tolist() == b.loss_mask.tolist() == plain.loss_mask
        assert a.behaviour_logprobs.tolist() == b.behaviour_logprobs.tolist() == plain.behaviour_logprobs


def test_commands_queued_along_a_publish_run_in_its_transaction(redis_server):
    """The controller's replay store rides in the group's publish transaction: one round trip for both,
    the same store and counters as a put of its own, and the entry id of the XADD comes back."""
    from learner.replay_buffer import ReplayBuffer

    async def go():
        r = async_client(redis_server.url, redis_server.password)
        ns = f"t-{uuid.uuid4().hex}"
        stream, replay = GroupStream(r, ns), ReplayBuffer(r, ns, threshold=0.5)
        await stream.ensure()
        group = _group("q1")
        along = [lambda pipe: replay.put_in(pipe, group.members[0]), lambda pipe: replay.put_in(pipe, group.members[1]),
                 lambda pipe: replay.count_injected_in(pipe, 2), lambda pipe: replay.count_injected_in(pipe, 0)]
        eid = await stream.publish(ScoredGroup("q1", group.members, "g7"), along)
        ((got_id, got),) = await stream.read(10, block_ms=100)
        stored, stats = await replay.get_many(["q1"]), await replay.stats()
        published = await stream.was_published(["g7"])
        await r.aclose()
        return eid, got_id, got, stored, stats, published

    eid, got_id, got, stored, stats, published = _run(go())
    assert eid == got_id and got.group_id == "g7" and published == [True]
    (item,) = stored  # only the correct member (index 0) is eligible
    assert item.sample_index == 0 and item.token_ids.tolist() == [1, 2, 3]
    assert (stats.stored, stats.stores, stats.injected, stats.lookups, stats.hits) == (1, 1, 2, 1, 1)
