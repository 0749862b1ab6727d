"""RAPO dataset pruning: per-epoch judged-correct counts and the pruned set on Redis, and which epochs may be judged.

Counts are attributed to the epoch a question was drawn in, once per draw; when every draw of
an epoch is scored, questions solved at rate >= threshold are pruned from every later epoch.
Living in Redis (with AOF), the counts and the pruned set survive a learner restart and a
resumed run keeps them; `EpochLedger` is the controller's part, kept in its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from learner.advantages import questions_to_prune

# Adds a draw's outcomes once: a re-run, a retry or a resumed run's second go at the same draw adds nothing.
# KEYS: counted draws, totals, corrects; ARGV: the draw's member, then (question id, 0/1) pairs.
_RECORD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
  if ARGV[i + 1] == '1' then redis.call('HINCRBY', KEYS[3], ARGV[i], 1) end
end
return 1
"""


def draw_id(group_id: str) -> str:
    """The scheduler draw a group runs for: a re-run after a staleness drop appends "r" to the group id
    (`Controller._admit_to_batch`) and a retried group keeps its id; drawn ids are "g" and a number."""
    return group_id.rstrip("r")


@dataclass
class EpochLedger:
    """Which epochs may be judged for pruning. An epoch closes once the scheduler has drawn its last
    question (it has ended) and each of its draws is settled (scored once, or given up), oldest
    epoch first: `PruningState.finish_epoch` only moves forward.

    Draws are keyed by `draw_id`, so a group's re-runs and retries are one draw: counted in once
    when drawn, out once when first settled.
    """

    open: dict[int, set[str]] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)

    def drawn(self, epoch: int, group_id: str, ended: Iterable[int] = ()) -> None:
        """A group drawn in ``epoch``; ``ended``: the epochs whose last question that draw took."""
        self.open.setdefault(epoch, set()).add(draw_id(group_id))
        self.ended.update(ended)

    def settle(self, epoch: int, group_id: str) -> bool:
        """The group's draw no longer holds its epoch open; False if it was settled before."""
        draws = self.open.get(epoch)
        key = draw_id(group_id)
        if not draws or key not in draws:
            return False
        draws.discard(key)
        if not draws:
            del self.open[epoch]
        return True

    def closable(self) -> list[int]:
        """Ended epochs whose draws are all settled, oldest first, up to the first that is still open."""
        out = []
        for epoch in sorted(self.ended):
            if self.open.get(epoch):
                break
            out.append(epoch)
        return out

    def closed(self, epoch: int) -> None:
        """``epoch`` was judged (its pruning applied): it is not returned again."""
        self.ended.discard(epoch)

    def to_dict(self) -> dict[str, Any]:
        return {"open": {str(e): sorted(d) for e, d in self.open.items()}, "ended": sorted(self.ended)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochLedger:
        return cls({int(e): set(ids) for e, ids in d["open"].items()}, set(d["ended"]))


class PruningState:
    def __init__(self, redis, namespace: str, threshold: float = 0.9):
        self.redis = redis
        self.prefix = f"{namespace}:pruning"
        self.threshold = threshold
        self._record = redis.register_script(_RECORD)

    async def record(self, epoch: int, group_id: str, outcomes: Iterable[tuple[str, bool]]) -> bool:
        """Add a group's judged outcomes (question id, correct) to ``epoch``'s counts, once per draw
        (`draw_id`) and question; False, adding nothing, when that draw was counted before."""
        pairs = [(qid, int(bool(correct))) for qid, correct in outcomes]
        if not pairs:
            return False
        # The question is part of the key: a resumed run may draw another question under a counted draw id.
        member = f"{draw_id(group_id)}|{pairs[0][0]}"
        keys = [f"{self.prefix}:{name}:{epoch}" for name in ("counted", "total", "correct")]
        return bool(await self._record(keys=keys, args=[member, *(x for pair in pairs for x in pair)]))

    async def finish_epoch(self, epoch: int, max_prune: int | None = None) -> set[str]:
        """Prune what ``epoch`` solved; idempotent, so a retried or resumed call prunes nothing twice.

        ``max_prune``: as in `questions_to_prune`.
        """
        last = await self.redis.get(f"{self.prefix}:last_epoch")
        if last is not None and int(last) >= epoch:
            return set()
        totals = _ints(await self.redis.hgetall(f"{self.prefix}:total:{epoch}"))
        correct = _ints(await self.redis.hgetall(f"{self.prefix}:correct:{epoch}"))
        pruned = questions_to_prune(correct, totals, self.threshold, max_prune)
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
