"""The tally of a batch of verdicts: where they came from, labels, retries, fallbacks and time.

The reward pool keeps one per scored batch; `rapo eval` keeps one for its questions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rewards.scoring import Score


@dataclass
class PoolReport:
    scores: int = 0
    resubmitted: int = 0
    duplicates: int = 0
    actor_failures: int = 0
    # Chunks whose task raised (not an actor death): their trajectories failed, reward 0.
    chunk_errors: int = 0
    sources: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    retries: int = 0
    fallbacks: int = 0
    latency_s: float = 0.0

    def add(self, score: Score) -> None:
        """Tally one trajectory's verdict: where it came from, its labels, retries and time."""
        self.scores += 1
        self.sources[score.judge_source] += 1
        self.labels.update(score.labels)
        self.retries += score.retries
        self.fallbacks += score.fallbacks
        self.latency_s += score.latency_s

    def metrics(self, prefix: str = "judge") -> dict[str, float]:
        out = {
            f"{prefix}/scored": self.scores,
            f"{prefix}/resubmitted": self.resubmitted,
            f"{prefix}/duplicates_dropped": self.duplicates,
            f"{prefix}/actor_failures": self.actor_failures,
            f"{prefix}/chunk_errors": self.chunk_errors,
            f"{prefix}/retries": self.retries,
            f"{prefix}/fallbacks": self.fallbacks,
            f"{prefix}/cache_hits": self.sources.get("cache", 0),
            f"{prefix}/latency_s": self.latency_s / self.scores if self.scores else 0.0,
        }
        out.update({f"{prefix}/source_{k}": v for k, v in self.sources.items()})
        out.update({f"labels/{k}": v for k, v in self.labels.items()})
        return out
