"""The records that travel through the pipeline: questions in, trajectories out.

A Trajectory is token-in-token-out: ``token_ids`` is the whole episode (prompt, generated
turns, tool responses) exactly as the engine saw it, ``loss_mask`` marks the tokens the
policy generated, and ``behaviour_logprobs`` holds the sampling policy's logprob of each
token (0 where the mask is 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


def describe_error(error: BaseException | str, limit: int = 500) -> str:
    """One line for a failed episode's record: the exception type and the start of its message."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " [...]"


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    hops: int = 1

    def golds(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    # "ok", or why the call could not run (bad JSON, unknown tool, bad arguments, backend error).
    status: str = "ok"
    error: str = ""
    result: str = ""
    # URLs a search returned (for redundancy labels), or the URL a query_url read.
    urls: list[str] = field(default_factory=list)
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Trajectory:
    question_id: str
    sample_index: int
    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    prompt_length: int
    tool_calls: list[ToolCall] = field(default_factory=list)
    final_text: str = ""
    answer: str | None = None
    # "answered" (a turn without tool calls), "max_tool_calls", "context", "turn_length", "aborted",
    # "error" (the episode failed; `error` says why).
    finish_reason: str = "answered"
    num_turns: int = 0
    format_ok: bool = False
    policy_version_start: int = 0
    policy_version_end: int = 0
    # Filled by the reward stage.
    reward: float | None = None
    correct: bool | None = None
    labels: list[str] = field(default_factory=list)
    replayed: bool = False
    worker: str = ""
    # Why the episode failed (an engine, tool, parse or judge error), "" when it did not. A failed
    # episode keeps its tokens for the record but trains none of them (loss mask 0) and gets reward 0.
    error: str = ""

    @classmethod
    def failed(cls, question_id: str, sample_index: int, error: BaseException | str, *,
               token_ids: list[int] | None = None, prompt_length: int = 0, version: int = 0) -> Trajectory:
        ids = list(token_ids or [])
        return cls(
            question_id=question_id, sample_index=sample_index, token_ids=ids, loss_mask=[0] * len(ids),
            behaviour_logprobs=[0.0] * len(ids), prompt_length=prompt_length, finish_reason="error",
            policy_version_start=version, policy_version_end=version, error=describe_error(error),
        )

    @property
    def generated_tokens(self) -> int:
        if isinstance(self.loss_mask, np.ndarray):
            # count_nonzero, not sum: a packed mask is uint8, whose sum would wrap at 256.
            return int(np.count_nonzero(self.loss_mask))
        return int(sum(self.loss_mask))

    @property
    def num_tool_calls(self) -> int:
        return len(self.tool_calls)

    def validate(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"trajectory {self.question_id}/{self.sample_index}: token_ids ({n}), loss_mask "
                f"({len(self.loss_mask)}) and behaviour_logprobs ({len(self.behaviour_logprobs)}) differ in length"
            )

    # Compact wire format: arrays as raw bytes, the rest as JSON. Used for Redis and checkpoints.
    def pack(self) -> Trajectory:
        """Token ids, loss mask and logprobs as numpy arrays of their wire types (in place).

        A rollout worker packs what it returns: arrays cross Ray without per-element pickling and
        encode for Redis without a per-element pass, so this work stays on the many workers
        instead of the one controller (three lists of a 4k-token episode cost it ~10 ms)."""
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.loss_mask = np.asarray(self.loss_mask, dtype=np.uint8)
        self.behaviour_logprobs = np.asarray(self.behaviour_logprobs, dtype=np.float32)
        return self

    def to_wire(self) -> dict[str, bytes]:
        # The meta JSON is what dataclasses.asdict would give, built by hand: asdict deep-copies every
        # field it meets (the tool calls' arguments too), the controller's largest cost per group.
        meta = {name: getattr(self, name) for name in _META_FIELDS}
        meta["tool_calls"] = [{name: getattr(c, name) for name in _TOOL_CALL_FIELDS} for c in self.tool_calls]
        return {
            "meta": json.dumps(meta, separators=(",", ":")).encode(),
            "ids": np.asarray(self.token_ids, dtype=np.int32).tobytes(),
            "mask": np.asarray(self.loss_mask, dtype=np.uint8).tobytes(),
            "logp": np.asarray(self.behaviour_logprobs, dtype=np.float32).tobytes(),
        }

    @classmethod
    def from_wire(cls, fields: dict[bytes | str, bytes]) -> Trajectory:
        get = lambda k: fields[k] if k in fields else fields[k.encode()]  # noqa: E731
        return cls.from_parts(json.loads(get("meta")), get("ids"), get("mask"), get("logp"))

    @classmethod
    def from_parts(cls, meta: dict[str, Any], ids, mask, logp) -> Trajectory:
        """From a decoded meta object (as `to_wire` encodes it, consumed) and the three arrays' bytes
        (or any buffer of the wire types)."""
        meta["tool_calls"] = [ToolCall(**c) for c in meta["tool_calls"]]
        # Packed, as a rollout worker returns them: numpy arrays over the entry's bytes (read-only, no
        # per-token Python objects), which go on to the learner as they are.
        return cls(
            token_ids=np.frombuffer(ids, dtype=np.int32),
            loss_mask=np.frombuffer(mask, dtype=np.uint8),
            behaviour_logprobs=np.frombuffer(logp, dtype=np.float32),
            **meta,
        )


_ARRAY_FIELDS = ("token_ids", "loss_mask", "behaviour_logprobs")
_META_FIELDS = tuple(f.name for f in fields(Trajectory) if f.name not in _ARRAY_FIELDS)
_TOOL_CALL_FIELDS = tuple(f.name for f in fields(ToolCall))
