"""The agent loop over a scripted engine: token bookkeeping, masks, limits, broken calls.

The engine is the only stand-in here (the real vLLM engine is exercised in the integration
tests); the tokenizer, the toolbox and the corpus are the real ones.
"""

import asyncio

import pytest

from rollout.agent_loop import AgentLoop, EpisodeLimits, EpisodeSampling
from rollout.engine import Generation
from rollout.tools.corpus import CorpusBackend, Document
from rollout.tools.toolbox import Toolbox
from rollout.types import Question

DOCS = [
    Document("https://atlas.example/wiki/Velmora", "Velmora - Atlas", "Velmora is a country on the coast. The capital of Velmora is Drennick."),
    Document("https://travel.example/velmora", "Velmora travel", "Travel to Velmora by ferry."),
]
Q = Question("q1", "What is the capital of Velmora?", "Drennick")
SEARCH = '<think>search</think>\n<tool_call>{"name": "search_urls", "arguments": {"query": "Velmora capital"}}</tool_call>'
READ = '<think>read</think>\n<tool_call>{"name": "query_url", "arguments": {"url": "https://atlas.example/wiki/Velmora", "goal": "capital of Velmora"}}</tool_call>'
ANSWER = "<think>found</think>\n\\boxed{Drennick}"


class ScriptedEngine:
    """Replies with the next scripted turn, ending it with <|im_end|> like a real model."""

    name = "scripted"

    def __init__(self, tokenizer, turns, finish="stop"):
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.finish = finish
        self.version = 3
        self.prompts = []

    async def generate(self, prompt_ids, sampling, request_id):
        self.prompts.append(list(prompt_ids))
        text = self.turns.pop(0)
        ids = self.tokenizer.encode(text + ("<|im_end|>" if self.finish == "stop" else ""), add_special_tokens=False)
        ids = ids[: sampling.max_tokens]
        return Generation(ids, [-0.5] * len(ids), self.finish, self.version, self.version)


def run_episode(tokenizer, turns, limits=EpisodeLimits(max_tool_calls=8, max_model_len=2048, max_tokens_per_turn=192), finish="stop"):
    engine = ScriptedEngine(tokenizer, turns, finish)
    loop = AgentLoop(engine, Toolbox(CorpusBackend(DOCS)), tokenizer, limits)
    return asyncio.run(loop.run(Q, 0, EpisodeSampling(), "r")), engine


def test_successful_episode_masks_and_logprobs(tokenizer):
    traj, engine = run_episode(tokenizer, [SEARCH, READ, ANSWER])
    traj.validate()
    assert traj.answer == "Drennick" and traj.format_ok and traj.finish_reason == "answered"
    assert [c.name for c in traj.tool_calls] == ["search_urls", "query_url"]
    assert "Drennick" in traj.tool_calls[1].result
    assert traj.num_turns == 3 and traj.policy_version_start == traj.policy_version_end == 3
    # Masked tokens are exactly the generated ones, with their logprobs; everything else is 0.
    generated = sum(len(tokenizer.encode(t + "<|im_end|>", add_special_tokens=False)) for t in [SEARCH, READ, ANSWER])
    assert sum(traj.loss_mask) == generated
    assert all((lp == -0.5) == bool(m) for lp, m in zip(traj.behaviour_logprobs, traj.loss_mask))
    assert traj.loss_mask[: traj.prompt_length] == [0] * traj.prompt_length
    # Token in, token out: each generate call saw exactly the ids accumulated so far.
    assert traj.token_ids[: len(engine.prompts[-1])] == engine.prompts[-1]
    text = tokenizer.decode(traj.token_ids[traj.prompt_length :])
    assert text.count("<tool_response>") == 2 and text.endswith("\\boxed{Drennick}<|im_end|>")


def test_broken_json_becomes_an_error_response_and_costs_format(tokenizer):
    broken = '<think>x</think>\n<tool_call>{"name": "search_urls", "arguments": {"query": </tool_call>'
    traj, _ = run_episode(tokenizer, [broken, ANSWER])
    assert traj.tool_calls[0].status == "malformed"
    assert "Error" in tokenizer.decode(traj.token_ids) and "not valid JSON" in traj.tool_calls[0].result
    assert traj.answer == "Drennick" and not traj.format_ok


def test_unknown_tool_and_bad_arguments(tokenizer):
    unknown = '<think>x</think>\n<tool_call>{"name": "browse", "arguments": {}}</tool_call>'
    bad = '<think>x</think>\n<tool_call>{"name": "query_url", "arguments": {"url": "https://atlas.example/wiki/Velmora"}}</tool_call>'
    traj, _ = run_episode(tokenizer, [unknown, bad, ANSWER])
    assert [c.status for c in traj.tool_calls] == ["unknown_tool", "bad_arguments"]
    assert "search_urls" in traj.tool_calls[0].result  # tells the model which tools exist
    assert "goal" in traj.tool_calls[1].error
    assert not traj.format_ok


def test_missing_page_is_a_tool_error_but_not_a_format_error(tokenizer):
    missing = '<think>x</think>\n<tool_call>{"name": "query_url", "arguments": {"url": "https://nowhere.example/x", "goal": "g"}}</tool_call>'
    traj, _ = run_episode(tokenizer, [missing, ANSWER])
    assert traj.tool_calls[0].status == "tool_error" and "page not found" in traj.tool_calls[0].result
    assert traj.format_ok


def test_tool_call_limit_ends_the_episode(tokenizer):
    traj, _ = run_episode(tokenizer, [SEARCH, SEARCH, SEARCH], limits=EpisodeLimits(max_tool_calls=2, max_model_len=4096))
    assert traj.finish_reason == "max_tool_calls" and traj.num_tool_calls == 2 and traj.answer is None
    assert not traj.format_ok


def test_context_limit_ends_the_episode(tokenizer):
    traj, _ = run_episode(tokenizer, [SEARCH, READ, ANSWER], limits=EpisodeLimits(max_model_len=420, max_tokens_per_turn=64))
    assert traj.finish_reason in {"context", "turn_length"}
    assert len(traj.token_ids) <= 420


def test_truncated_turn_is_not_an_answer(tokenizer):
    traj, _ = run_episode(tokenizer, [ANSWER], finish="length")
    assert traj.finish_reason == "turn_length" and traj.answer is None and not traj.format_ok


def test_prompt_longer_than_context_is_refused(tokenizer):
    with pytest.raises(ValueError, match="max_model_len"):
        run_episode(tokenizer, [ANSWER], limits=EpisodeLimits(max_model_len=64))
