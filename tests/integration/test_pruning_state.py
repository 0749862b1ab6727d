"""RAPO's pruning state on a real Redis server: counts per epoch and question, once per draw; the pruned set."""

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
        await state.record(0, "g1", [("a", True)] * 4)
        await state.record(0, "g2", [("b", True), ("b", False), ("c", False), ("b", True)])
        await state.record(0, "g3", [("b", True), ("c", False)])
        await state.record(0, "g4", [])
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


def test_a_draw_counts_once_across_reruns_retries_and_a_resumed_run(redis_server):
    async def go():
        r = async_client(redis_server.url, redis_server.password)
        ns = f"t-{uuid.uuid4().hex}"
        state = PruningState(r, ns, threshold=0.9)
        solved, half = [("a", True)] * 4, [("b", True), ("b", False)] * 2
        firsts = [await state.record(0, "g1", solved), await state.record(0, "g2", half)]
        # g2 dropped as too stale and re-run, failed after assembly and retried, then a resumed run
        # (a second controller on the same Redis) scores the same draw again: all solved this time.
        again = [await state.record(0, g, [("b", True)] * 4) for g in ("g2r", "g2", "g2rr")]
        again.append(await PruningState(r, ns, threshold=0.9).record(0, "g2", [("b", True)] * 4))
        # The same draw id for another question (a resumed run drew differently) counts for it.
        other = await state.record(0, "g2", [("c", False)] * 4)
        totals = await r.hgetall(f"{ns}:pruning:total:0")
        pruned = await state.finish_epoch(0)
        await r.aclose()
        return firsts, again, other, totals, pruned

    firsts, again, other, totals, pruned = asyncio.run(go())
    assert firsts == [True, True] and again == [False] * 4 and other is True
    assert {k.decode(): int(v) for k, v in totals.items()} == {"a": 4, "b": 4, "c": 4}
    assert pruned == {"a"}  # b stays at 2/4 solved: the re-runs' 4/4 did not count
