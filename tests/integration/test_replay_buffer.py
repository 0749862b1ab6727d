"""RAPO's replay buffer on a real Redis server: what is stored, found, evicted, and counted."""

from __future__ import annotations

import asyncio
import uuid

from actors.redis_client import async_client
from learner.replay_buffer import ReplayBuffer
from rollout.types import ToolCall, Trajectory


def _traj(qid: str, *, reward: float = 1.0, correct: bool = True, replayed: bool = False, n: int = 300) -> Trajectory:
    return Trajectory(
        qid, 3, [(i * 7919) % 150_000 for i in range(n)], [0] * 10 + [1] * (n - 10), [0.0] * 10 + [-0.5] * (n - 10),
        10, tool_calls=[ToolCall("search_urls", {"query": qid}, urls=[f"https://a.example/{qid}"])], answer="A",
        reward=reward, correct=correct, replayed=replayed, policy_version_start=4, policy_version_end=5,
    )


def _run(redis_server, body):
    async def go():
        r = async_client(redis_server.url, redis_server.password)
        try:
            return await body(r, f"t-{uuid.uuid4().hex}")
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_stores_only_eligible_successes_and_finds_them_with_counts(redis_server):
    async def body(r, ns):
        buf = ReplayBuffer(r, ns, threshold=0.5, max_entries=10)
        stored = [await buf.put(t) for t in (
            _traj("a"), _traj("b", correct=False, reward=0.0), _traj("c", reward=0.4),
            _traj("d", replayed=True), _traj("e"),
        )]
        found = await buf.get_many(["a", "b", "missing", "e"])
        await buf.count_injected(2)
        return stored, found, await buf.stats()

    stored, found, stats = _run(redis_server, body)
    assert stored == [True, False, False, False, True]
    a, b, missing, e = found
    assert b is None and missing is None
    want = _traj("a")
    assert a.token_ids.tolist() == want.token_ids and a.loss_mask.tolist() == want.loss_mask
    assert a.behaviour_logprobs.tolist() == want.behaviour_logprobs
    assert (a.question_id, a.reward, a.correct, a.tool_calls, a.policy_version_start) == ("a", 1.0, True,
                                                                                          want.tool_calls, 4)
    assert e.question_id == "e"
    assert (stats.stored, stats.stores, stats.lookups, stats.hits, stats.injected, stats.evicted) == (2, 2, 4, 2, 2, 0)
    assert stats.hit_rate == 0.5


def test_keeps_the_most_recently_stored_within_max_entries_and_counts_evictions(redis_server):
    async def body(r, ns):
        buf = ReplayBuffer(r, ns, max_entries=3)
        for q in ("a", "b", "c", "d", "b", "e"):  # "b" refreshed: "a" then "c" are the least recent
            await buf.put(_traj(q))
        found = await buf.get_many(["a", "b", "c", "d", "e"])
        return [t.question_id if t else None for t in found], await buf.stats(), await r.keys(f"{ns}:replay:item:*")

    found, stats, items = _run(redis_server, body)
    assert found == [None, "b", None, "d", "e"]
    assert (stats.stored, stats.stores, stats.evicted, stats.lookups, stats.hits) == (3, 6, 2, 5, 3)
    assert len(items) == 3  # evicted items are deleted with their index entries


def test_an_empty_lookup_touches_nothing(redis_server):
    async def body(r, ns):
        buf = ReplayBuffer(r, ns)
        return await buf.get_many([]), await buf.stats()

    found, stats = _run(redis_server, body)
    assert found == [] and (stats.lookups, stats.hits) == (0, 0)
