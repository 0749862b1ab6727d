"""Bounded staleness: when may a new group start, and is a finished group still fresh enough to train on.

Admission follows AReaL's rule, counted in groups: with ``finished`` groups produced (waiting
in the queue or already trained) and ``running`` groups in generation, a new group starts
only while finished + running < (max_staleness + step + 1) * batch_size, where ``step`` is
the number of training steps done. max_staleness = 0 is synchronous training: the next batch
starts only when the previous one has been trained on. With ``total_steps`` known, the bound
never reaches past the run's last batch: no group starts that no step would train on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Admission:
    batch_size: int
    max_staleness: int
    total_steps: int | None = None
    finished: int = 0
    running: int = 0

    def capacity(self, step: int) -> int:
        batches = self.max_staleness + step + 1
        if self.total_steps is not None:
            batches = min(batches, self.total_steps)
        return batches * self.batch_size

    def can_admit(self, step: int) -> bool:
        return self.finished + self.running < self.capacity(step)

    def admit(self) -> None:
        self.running += 1

    def finish(self) -> None:
        self.running -= 1
        self.finished += 1

    def abandon(self) -> None:
        """A running group that will be re-admitted (its worker died): its slot is free again."""
        self.running -= 1

    def drop(self) -> None:
        """A finished group judged too stale to train on: it no longer counts as produced."""
        self.finished -= 1


@dataclass
class StalenessPolicy:
    """What happens to a sample whose staleness exceeds the bound: dropped, or trained down-weighted."""

    max_staleness: int
    action: str = "drop"  # "drop" | "downweight"
    downweight: float = 0.5
    histogram: Counter = field(default_factory=Counter)

    def weight(self, lag: int) -> float:
        """1 for fresh samples, 0 (drop) or ``downweight`` for over-stale ones; records the lag.

        A negative lag is a group from weights that no longer exist (a crashed run trained past its
        last checkpoint, which the resumed run continues from): it is always dropped and re-run.
        """
        if lag < 0:
            return 0.0
        self.histogram[lag] += 1
        if lag <= self.max_staleness:
            return 1.0
        return 0.0 if self.action == "drop" else self.downweight
