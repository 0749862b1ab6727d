"""What a rollout worker is asked to play: one episode of a question, with its sampling seed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rollout.types import Question


@dataclass(frozen=True)
class EpisodeRequest:
    question: Question
    sample_index: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None


def episode_seed(run_seed: int, group: int | str, question_id: str, sample: int) -> int:
    """The sampling seed of one episode: reproducible from the run seed, stable across restarts."""
    digest = hashlib.blake2b(f"{run_seed}/{group}/{question_id}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
