"""RAPO's per-question replay buffer on Redis: the latest successful trajectory of each question.

One hash per question holds the trajectory (token ids, masks, behaviour logprobs, reward,
policy version); a sorted set orders questions by last store so the buffer stays within
``max_entries`` by evicting the least recently refreshed. A store and its eviction run as
one Lua script, so concurrent writers never leave an index without its item or the reverse; the
buffer's counters (stores, evictions, lookups, hits) are kept by the same scripts, in the same
round trip.
Redis' AOF makes the buffer survive a Redis or learner restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from rollout.types import Trajectory

_PUT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
local seq = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
local evicted = 0
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], extra)
  for i = 1, #old, 2 do
    redis.call('DEL', ARGV[3] .. old[i])
    evicted = evicted + 1
  end
end
redis.call('HINCRBY', KEYS[4], 'stores', 1)
if evicted > 0 then redis.call('HINCRBY', KEYS[4], 'evicted', evicted) end
return evicted
"""

# The items of KEYS (flat field/value lists, empty where absent); the lookups and hits are counted in the same call.
# KEYS: the stats hash, then the items.
_GET = """
local out, hits = {}, 0
for i = 2, #KEYS do
  local item = redis.call('HGETALL', KEYS[i])
  if #item > 0 then hits = hits + 1 end
  out[i - 1] = item
end
redis.call('HINCRBY', KEYS[1], 'lookups', #KEYS - 1)
redis.call('HINCRBY', KEYS[1], 'hits', hits)
return out
"""


@dataclass
class ReplayStats:
    stored: int
    stores: int
    lookups: int
    hits: int
    injected: int
    evicted: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class ReplayBuffer:
    def __init__(self, redis, namespace: str, *, threshold: float = 0.5, max_entries: int = 100_000):
        self.redis = redis
        self.prefix = f"{namespace}:replay"
        self.threshold = threshold
        self.max_entries = max_entries
        self._put = redis.register_script(_PUT)
        self._get = redis.register_script(_GET)

    def _item(self, question_id: str) -> str:
        return f"{self.prefix}:item:{question_id}"

    def eligible(self, traj: Trajectory) -> bool:
        """Only fresh, judged-correct rollouts above the threshold; a replayed copy never refreshes itself."""
        return bool(traj.correct) and traj.reward is not None and traj.reward > self.threshold and not traj.replayed

    async def put(self, traj: Trajectory) -> bool:
        if not self.eligible(traj):
            return False
        keys, args = self._put_call(traj)
        await self._put(keys=keys, args=args)
        return True

    def put_in(self, pipe, traj: Trajectory) -> bool:
        """`put`, queued on the caller's pipeline (the group stream's publish transaction): no round trip
        of its own. EVAL, not EVALSHA: a pipeline cannot load a missing script half way."""
        if not self.eligible(traj):
            return False
        keys, args = self._put_call(traj)
        pipe.eval(_PUT, len(keys), *keys, *args)
        return True

    def _put_call(self, traj: Trajectory) -> tuple[list, list]:
        fields: list[bytes] = []
        for key, value in traj.to_wire().items():
            fields += [key.encode(), value]
        keys = [self._item(traj.question_id), f"{self.prefix}:lru", f"{self.prefix}:seq", f"{self.prefix}:stats"]
        return keys, [traj.question_id, self.max_entries, f"{self.prefix}:item:", *fields]

    async def get_many(self, question_ids: list[str]) -> list[Trajectory | None]:
        if not question_ids:
            return []
        replies = await self._get(keys=[f"{self.prefix}:stats", *(self._item(q) for q in question_ids)])
        return [Trajectory.from_wire(dict(zip(r[::2], r[1::2]))) if r else None for r in replies]

    async def count_injected(self, n: int) -> None:
        if n:
            await self.redis.hincrby(f"{self.prefix}:stats", "injected", n)

    def count_injected_in(self, pipe, n: int) -> None:
        """`count_injected`, queued on the caller's pipeline."""
        if n:
            pipe.hincrby(f"{self.prefix}:stats", "injected", n)

    async def stats(self) -> ReplayStats:
        raw = await self.redis.hgetall(f"{self.prefix}:stats")
        get = lambda k: int(raw.get(k.encode(), raw.get(k, 0)))  # noqa: E731
        stored = int(await self.redis.zcard(f"{self.prefix}:lru"))
        return ReplayStats(stored, get("stores"), get("lookups"), get("hits"), get("injected"), get("evicted"))
