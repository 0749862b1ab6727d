"""The multi-turn agent loop: generate, parse tool calls, run tools, append results, repeat.

Token-in-token-out: the episode is one growing list of token ids. Generated tokens get
loss mask 1 and keep their behaviour logprobs; prompt and tool-response tokens get mask 0.
Earlier text is never re-tokenised, so what the learner trains on is exactly what the
engine sampled.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from rollout.chat_format import (
    IM_END,
    SYSTEM_PROMPT,
    extract_boxed,
    parse_tool_calls,
    prompt_pieces,
    tool_turn_pieces,
    turn_is_well_formed,
)
from rollout.engine import Engine, SamplingConfig
from rollout.safe_encode import encode_pieces
from rollout.tools.toolbox import Toolbox
from rollout.types import Question, ToolCall, Trajectory

# Statuses that mean the model wrote a bad call; a backend failure (page not found) is not the model's format fault.
FORMAT_ERRORS = {"malformed", "unknown_tool", "bad_arguments"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeLimits:
    max_tool_calls: int = 32
    max_model_len: int = 2048
    max_tokens_per_turn: int = 192
    # A turn with less room than this cannot say anything useful: end the episode instead.
    min_turn_tokens: int = 8


@dataclass(frozen=True)
class EpisodeSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class _EpisodeState:
    """What an episode has built so far, kept by run() when the episode fails part way."""

    ids: list[int] = field(default_factory=list)
    prompt_length: int = 0


class AgentLoop:
    def __init__(
        self, engine: Engine, toolbox: Toolbox, tokenizer, limits: EpisodeLimits, system_prompt: str = SYSTEM_PROMPT
    ):
        self.engine = engine
        self.toolbox = toolbox
        self.tokenizer = tokenizer
        self.limits = limits
        self.system_prompt = system_prompt

    def encode(self, pieces) -> list[int]:
        """Template pieces to ids; questions and tool results never become control tokens."""
        return encode_pieces(self.tokenizer, pieces)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    async def run(
        self, question: Question, sample_index: int, sampling: EpisodeSampling, request_id: str
    ) -> Trajectory:
        """One episode. Whatever fails inside it (encoding, engine, tools) ends this episode only: the
        trajectory comes back with finish_reason "error" and the error recorded, its tokens kept but
        none trained on. Cancellation still propagates."""
        state = _EpisodeState()
        try:
            return await self._play(question, sample_index, sampling, request_id, state)
        except Exception as e:  # noqa: BLE001 - the error boundary of one episode
            log.warning("episode %s/%d failed: %s: %s", question.id, sample_index, type(e).__name__, str(e)[:200])
            return Trajectory.failed(
                question.id,
                sample_index,
                e,
                token_ids=state.ids,
                prompt_length=state.prompt_length,
                version=self.engine.version,
            )

    async def _play(
        self, question: Question, sample_index: int, sampling: EpisodeSampling, request_id: str, state: _EpisodeState
    ) -> Trajectory:
        limits = self.limits
        prompt = self.encode(prompt_pieces(question.question, self.system_prompt))
        if len(prompt) + limits.min_turn_tokens > limits.max_model_len:
            raise ValueError(
                f"question {question.id}: the prompt is {len(prompt)} tokens, too long for "
                f"rollout.max_model_len={limits.max_model_len}"
            )
        ids = state.ids
        ids += prompt
        prompt_length = state.prompt_length = len(ids)
        mask = [0] * prompt_length
        logps = [0.0] * prompt_length
        calls: list[ToolCall] = []
        turns: list[str] = []
        version_start = self.engine.version
        finish = "answered"
        turn = 0
        while True:
            budget = min(limits.max_tokens_per_turn, limits.max_model_len - len(ids))
            if budget < limits.min_turn_tokens:
                finish = "context"
                break
            seed = None if sampling.seed is None else sampling.seed + turn
            gen = await self.engine.generate(
                ids, SamplingConfig(budget, sampling.temperature, sampling.top_p, seed), f"{request_id}-t{turn}"
            )
            if turn == 0:
                version_start = gen.version_start
            ids += gen.token_ids
            mask += [1] * len(gen.token_ids)
            logps += gen.logprobs
            text = self.decode(gen.token_ids)
            turns.append(text.removesuffix(IM_END))
            turn += 1
            if gen.finish_reason == "abort":
                finish = "aborted"
                break
            if gen.finish_reason != "stop":
                finish = "turn_length" if len(ids) < limits.max_model_len else "context"
                break
            parsed = parse_tool_calls(text)
            if not parsed:
                finish = "answered"
                break
            room = limits.max_tool_calls - len(calls)
            if room <= 0:
                # The turn after the last allowed call may only answer: a call there is not run.
                finish = "max_tool_calls"
                break
            results = await asyncio.gather(*(self.toolbox.call(p, turn - 1) for p in parsed[:room]))
            calls.extend(results)
            # At the budget the model still sees the results of its last calls and gets one turn to
            # answer from them: ending here would waste that call and score an episode that
            # searched below one that answered without searching (0 vs the format reward).
            observation = self.encode(tool_turn_pieces([r.result for r in results]))
            if len(ids) + len(observation) + limits.min_turn_tokens > limits.max_model_len:
                finish = "context"
                break
            ids += observation
            mask += [0] * len(observation)
            logps += [0.0] * len(observation)

        answer = extract_boxed(turns[-1]) if finish == "answered" and turns else None
        format_ok = (
            finish == "answered"
            and all(turn_is_well_formed(t, final=(i == len(turns) - 1)) for i, t in enumerate(turns))
            and not any(c.status in FORMAT_ERRORS for c in calls)
        )
        return Trajectory(
            question_id=question.id,
            sample_index=sample_index,
            token_ids=ids,
            loss_mask=mask,
            behaviour_logprobs=logps,
            prompt_length=prompt_length,
            tool_calls=calls,
            final_text=turns[-1] if turns else "",
            answer=answer,
            finish_reason=finish,
            num_turns=len(turns),
            format_ok=format_ok,
            policy_version_start=version_start,
            policy_version_end=self.engine.version,
        )
