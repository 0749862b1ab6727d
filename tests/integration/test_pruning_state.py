"""RAPO's pruning state on a real Redis server: counts per epoch and question, the pruned set."""

from __future__ import annotations

import asyncio
import uuid

from actors.redis_client import async_client
from learner.pruning import PruningState


def test_counts_add_up_per_question_and_solved_questions_are_pruned(redis_server):
    async def go():
        r = async_client(redis_server.url, redis_server.password)
        state = PruningState(r, f"t-{uuid.uuid4().hex}", threshold=0.75)
        # Groups of one question each, and one mixed batch; "b" is solved 3 of 4 times, "c" never.
        await state.record(0, [("a", True)] * 4)
        await state.record(0, [("b", True), ("b", False), ("c", False), ("b", True)])
        await state.record(0, [("b", True), ("c", False)])
        await state.record(0, [])
        totals = await r.hgetall(f"{state.prefix}:total:0")
        correct = await r.hgetall(f"{state.prefix}:correct:0")
        pruned = await state.finish_epoch(0)
        again = await state.finish_epoch(0)
        stored = await state.pruned()
        await r.aclose()
        return totals, correct, pruned, again, stored

    totals, correct, pruned, again, stored = asyncio.run(go())
    assert {k.decode(): int(v) for k, v in totals.items()} == {"a": 4, "b": 4, "c": 2}
    assert {k.decode(): int(v) for k, v in correct.items()} == {"a": 4, "b": 3}
    assert pruned == stored == {"a", "b"} and again == set()
