"""The reward-labeller pool on real Ray actors, against a real OpenAI-protocol HTTP server."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from actors.reward_pool import RewardPool
from cluster.bootstrap import start_local_ray
from cluster.config import RewardsConfig
from rewards.answer import rule_judge
from rewards.formulas import stage2_reward
from rewards.judge_client import JudgeSettings
from rewards.labeller import rule_labels
from rollout.types import Question, ToolCall, Trajectory
from tests.servers.openai_server import OpenAITestServer

KEY = "sk-pool-test-key"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False,
                    runtime_env={"env_vars": {"RAPO_JUDGE_API_KEY": KEY}})
    yield
    ray.shutdown()


def _batch(n: int) -> tuple[list[Trajectory], dict[str, Question]]:
    questions = {f"q{i % 5}": Question(f"q{i % 5}", f"Who founded Place{i % 5}?", f"Founder {i % 5}") for i in range(n)}
    trajs = []
    for i in range(n):
        calls = [
            ToolCall(
                "search_urls",
                {"query": f"Place{i % 5} founder"},
                urls=[f"https://a.example/{i % 5}", "https://b.example/x"],
            ),
            ToolCall("search_urls", {"query": f"Place{i % 5} founder"}, urls=[f"https://a.example/{i % 5}"]),
            ToolCall(
                "query_url",
                {"url": f"https://a.example/{i % 5}", "goal": "founder"},
                urls=[f"https://a.example/{i % 5}"],
            ),
        ][: 1 + i % 3]
        answer = f"Founder {i % 5}" if i % 2 == 0 else "Somebody Else"
        trajs.append(
            Trajectory(
                f"q{i % 5}", i, [1, 2], [0, 1], [0.0, -0.1], 1, tool_calls=calls, answer=answer, format_ok=i % 4 != 3
            )
        )
    return trajs, questions


def _expected(t: Trajectory, q: Question) -> float:
    return stage2_reward(t.format_ok, rule_judge(t.answer, q.golds()), rule_labels(t.tool_calls))


def test_rule_pool_scores_every_trajectory_once():
    trajs, questions = _batch(30)
    pool = RewardPool.create(RewardsConfig(stage=2, num_actors=2), redis_url=None, redis_password=None, namespace="t")
    report = asyncio.run(pool.score(trajs, questions))
    asyncio.run(pool.close())
    assert report.scores == 30 and report.duplicates == 0
    for t in trajs:
        assert t.reward == pytest.approx(_expected(t, questions[t.question_id]))
        assert len(t.labels) == len(t.tool_calls)
    assert report.labels["REDUNDANTSEARCH"] > 0 and report.labels["EXPLORATION"] > 0


def test_llm_pool_survives_a_killed_actor_and_matches_the_rules(redis_server):
    trajs, questions = _batch(48)
    with OpenAITestServer(latency_s=0.15, api_key=KEY) as srv:
        cfg = RewardsConfig(
            stage=2,
            num_actors=2,
            chunk_size=4,
            max_in_flight_per_actor=8,
            cache=False,
            judge=JudgeSettings(base_url=srv.base_url, model=srv.model, timeout_s=5, max_retries=2),
        )
        pool = RewardPool.create(
            cfg, redis_url=redis_server.url, redis_password=redis_server.password, namespace="kill"
        )

        async def run():
            await pool.ready()
            task = asyncio.ensure_future(pool.score(trajs, questions))
            deadline = time.monotonic() + 10
            while srv.request_count < 8 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            ray.kill(pool.actors[0], no_restart=False)  # dies mid-batch; Ray restarts it
            return await task

        report = asyncio.run(run())
        asyncio.run(pool.close())
    assert report.actor_failures >= 1 and report.resubmitted > 0
    assert report.scores == len(trajs)  # exactly one reward each, nothing lost
    for t in trajs:
        assert t.reward == pytest.approx(_expected(t, questions[t.question_id]))
    assert report.sources["llm"] > 0


def test_judgements_are_cached_in_redis(redis_server):
    trajs, questions = _batch(8)
    with OpenAITestServer(api_key=KEY) as srv:
        cfg = RewardsConfig(
            stage=1, num_actors=1, judge=JudgeSettings(base_url=srv.base_url, model=srv.model), cache=True
        )
        pool = RewardPool.create(
            cfg, redis_url=redis_server.url, redis_password=redis_server.password, namespace="cache-test"
        )
        first = asyncio.run(pool.score(trajs, questions))
        calls = srv.request_count
        again, _ = _batch(8)
        second = asyncio.run(pool.score(again, questions))
        asyncio.run(pool.close())
    assert calls > 0 and srv.request_count == calls  # the second pass paid nothing
    assert second.sources["cache"] == 8 and first.sources["cache"] == 0
    assert [t.reward for t in trajs] == [t.reward for t in again]


def test_an_episode_whose_judging_raises_fails_alone():
    trajs, questions = _batch(8)
    # A gold answer that is not text makes the rule judge raise for q3's trajectories (as any judge error would).
    questions["q3"] = Question("q3", "Who founded Place3?", None)  # type: ignore[arg-type]
    trajs.append(Trajectory.failed("q1", 99, RuntimeError("engine died"), token_ids=[1, 2], prompt_length=2))
    pool = RewardPool.create(
        RewardsConfig(stage=1, num_actors=1, chunk_size=8), redis_url=None, redis_password=None, namespace="t"
    )
    report = asyncio.run(pool.score(trajs, questions))
    asyncio.run(pool.close())
    assert report.scores == 9 and report.sources["error"] == 1 and report.sources["failed"] == 1
    for t in trajs:
        if t.question_id == "q3":
            assert t.reward == 0.0 and t.error.startswith("TypeError") and t.finish_reason == "error"
        elif t.sample_index == 99:
            assert t.reward == 0.0 and t.error == "RuntimeError: engine died"
        else:  # the siblings in the same chunk were judged as usual
            assert not t.error and t.correct == rule_judge(t.answer, questions[t.question_id].golds())


def test_concurrent_group_calls_share_the_actors():
    """The controller scores each group with its own call: together they must use every actor, and a
    call that finds every actor full waits for room instead of failing."""
    pool = RewardPool.create(
        RewardsConfig(stage=2, num_actors=4, chunk_size=4), redis_url=None, redis_password=None, namespace="spread"
    )
    dealt = [0] * 4
    pool.actors = [_CountingHandle(a, dealt, i) for i, a in enumerate(pool.actors)]
    groups = [_batch(8) for _ in range(8)]

    async def run():
        return await asyncio.gather(*(pool.score(trajs, questions) for trajs, questions in groups))

    reports = asyncio.run(run())
    pool.actors = [a.handle for a in pool.actors]
    asyncio.run(pool.close())
    assert [r.scores for r in reports] == [8] * 8 and all(r.duplicates == 0 for r in reports)
    assert all(t.reward is not None for trajs, _ in groups for t in trajs)
    # 8 groups x 2 chunks over every actor (a per-call count deals them [8, 8, 0, 0])
    assert sum(dealt) == 16 and min(dealt) >= 2, dealt
    assert pool.load == [0, 0, 0, 0]


class _CountingHandle:
    """An actor handle that counts the chunks the pool deals to it (what the pool decides, whatever the actor does)."""

    def __init__(self, handle, dealt: list[int], index: int):
        self.handle, self.dealt, self.index = handle, dealt, index

    @property
    def score(self):
        outer = self

        class _Method:
            @staticmethod
            def remote(items):
                outer.dealt[outer.index] += 1
                return outer.handle.score.remote(items)

        return _Method

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_calls_wait_for_room_when_every_actor_is_full():
    # One actor taking one chunk at a time: five concurrent calls queue behind each other.
    cfg = RewardsConfig(stage=1, num_actors=1, chunk_size=4, max_in_flight_per_actor=4)
    pool = RewardPool.create(cfg, redis_url=None, redis_password=None, namespace="room")
    groups = [_batch(8) for _ in range(5)]

    async def run():
        return await asyncio.gather(*(pool.score(trajs, questions) for trajs, questions in groups))

    reports = asyncio.run(run())
    asyncio.run(pool.close())
    assert [r.scores for r in reports] == [8] * 5
    assert all(t.reward == pytest.approx(_expected1(t, q[t.question_id])) for trajs, q in groups for t in trajs)
    assert pool.load == [0]


def _expected1(t: Trajectory, q: Question) -> float:
    from rewards.formulas import stage1_reward

    return stage1_reward(t.format_ok, rule_judge(t.answer, q.golds()), RewardsConfig().spec().format_weight)
