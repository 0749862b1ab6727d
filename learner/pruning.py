"""RAPO dataset pruning state on Redis: per-epoch judged-correct counts and the pruned set.

Counts are attributed to the epoch a question was drawn in; when an epoch's rollouts are all
scored, questions solved at rate >= threshold are pruned from every later epoch. Living in
Redis (with AOF), the pruned set survives a learner restart and a resumed run keeps it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from learner.advantages import questions_to_prune


class PruningState:
    def __init__(self, redis, namespace: str, threshold: float = 0.9):
        self.redis = redis
        self.prefix = f"{namespace}:pruning"
        self.threshold = threshold

    async def record(self, epoch: int, outcomes: Iterable[tuple[str, bool]]) -> None:
        """Add judged outcomes (question id, correct) to ``epoch``'s counts."""
        totals: Counter[str] = Counter()
        solved: Counter[str] = Counter()
        for qid, correct in outcomes:
            totals[qid] += 1
            solved[qid] += bool(correct)
        if not totals:
            return
        # One increment per question (a group is one question's n rollouts), not one per rollout.
        async with self.redis.pipeline(transaction=True) as pipe:
            for qid, n in totals.items():
                pipe.hincrby(f"{self.prefix}:total:{epoch}", qid, n)
                if solved[qid]:
                    pipe.hincrby(f"{self.prefix}:correct:{epoch}", qid, solved[qid])
            await pipe.execute()

    async def finish_epoch(self, epoch: int) -> set[str]:
        """Prune what ``epoch`` solved; idempotent, so a retried or resumed call prunes nothing twice."""
        last = await self.redis.get(f"{self.prefix}:last_epoch")
        if last is not None and int(last) >= epoch:
            return set()
        totals = _ints(await self.redis.hgetall(f"{self.prefix}:total:{epoch}"))
        correct = _ints(await self.redis.hgetall(f"{self.prefix}:correct:{epoch}"))
        pruned = questions_to_prune(correct, totals, self.threshold)
        async with self.redis.pipeline(transaction=True) as pipe:
            if pruned:
                pipe.sadd(f"{self.prefix}:pruned", *sorted(pruned))
            pipe.set(f"{self.prefix}:last_epoch", epoch)
            await pipe.execute()
        return pruned

    async def pruned(self) -> set[str]:
        return {m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(f"{self.prefix}:pruned")}


def _ints(raw: dict) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
