"""Successful demo-world episodes, written by following each question's solution plan.

They use the real Toolbox and the agent loop's exact text pieces, so the warm-started policy
sees in training precisely what it will see in rollouts.
"""

from __future__ import annotations

import json

from rollout.chat_format import IM_END, ParsedCall, prompt_pieces, tool_turn_pieces
from rollout.demo_world import Hop
from rollout.safe_encode import encode_pieces
from rollout.tools.toolbox import Toolbox
from rollout.types import Question, Trajectory


def _call_text(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


async def gold_trajectory(question: Question, plan: list[Hop], toolbox: Toolbox, tokenizer) -> Trajectory | None:
    """The episode of an agent that searches, reads the right page and answers, hop by hop.

    None when the plan's search does not return the page that holds the fact: a
    demonstration that reads a URL it never saw would teach inventing URLs.
    """
    encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    ids = encode_pieces(tokenizer, prompt_pieces(question.question))
    mask = [0] * len(ids)
    calls = []

    def say(text: str) -> None:
        piece = encode(text + IM_END)
        ids.extend(piece)
        mask.extend([1] * len(piece))

    def observe(result: str) -> None:
        piece = encode_pieces(tokenizer, tool_turn_pieces([result]))
        ids.extend(piece)
        mask.extend([0] * len(piece))

    turn = 0
    for hop in plan:
        search = {"query": hop.query}
        say(f"<think>I need the {hop.goal}.</think>\n" + _call_text("search_urls", search))
        found = await toolbox.call(ParsedCall("search_urls", search), turn)
        turn += 1
        if hop.url not in found.urls:
            return None
        observe(found.result)
        query = {"url": hop.url, "goal": hop.goal}
        say(f"<think>{hop.url} should say it.</think>\n" + _call_text("query_url", query))
        read = await toolbox.call(ParsedCall("query_url", query), turn)
        turn += 1
        if hop.value not in read.result:
            return None
        observe(read.result)
        calls += [found, read]
    answer = plan[-1].value
    say(f"<think>The {plan[-1].goal} is {answer}.</think>\n\\boxed{{{answer}}}")
    return Trajectory(
        question_id=question.id,
        sample_index=0,
        token_ids=ids,
        loss_mask=mask,
        behaviour_logprobs=[0.0] * len(ids),
        prompt_length=mask.index(1),
        tool_calls=calls,
        answer=answer,
        num_turns=2 * len(plan) + 1,
        format_ok=True,
        correct=True,
    )
