"""Which questions each step trains on: epochs over the active set, reshuffled per epoch.

An epoch's order is a permutation of every question (seeded by run seed and epoch), and a
draw skips the ones pruned by then. The order never depends on the pruned set, so a prune that
lands mid-epoch (an earlier epoch closing) skips questions without reshuffling the rest:
within an epoch no question is drawn twice and every one not pruned is drawn once.
The state (epoch, position, pruned ids) is plain data so that it can be checkpointed and
restored; the same seed and state always give the same next batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Draw:
    ids: list[str] = field(default_factory=list)
    epochs: dict[str, int] = field(default_factory=dict)
    # Epochs whose last question is in this draw: once its rollouts are scored, they can be pruned.
    ended: list[int] = field(default_factory=list)


@dataclass
class SchedulerState:
    epoch: int = 0
    position: int = 0
    pruned: list[str] = field(default_factory=list)


class PromptScheduler:
    def __init__(self, question_ids: list[str], seed: int, state: SchedulerState | None = None):
        if not question_ids:
            raise ValueError("the training set is empty")
        if len(set(question_ids)) != len(question_ids):
            raise ValueError("question ids must be unique")
        self.ids = list(question_ids)
        self.seed = seed
        self.state = state or SchedulerState()
        self._cached: tuple[int, list[str]] = (-1, [])

    def _order(self, epoch: int) -> list[str]:
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached = (epoch, [self.ids[i] for i in rng.permutation(len(self.ids))])
        return self._cached[1]

    @property
    def active(self) -> int:
        return len(self.ids) - len(set(self.state.pruned))

    def next_batch(self, k: int) -> Draw:
        """k question ids, the epoch each was drawn in, and the epochs this draw finished.

        A batch never holds a question twice; when the epoch runs out mid-batch the next
        epoch's order fills it (skipping ids already drawn).
        """
        if self.active < k:
            raise ValueError(f"only {self.active} active questions left, fewer than the {k} a step needs")
        pruned = set(self.state.pruned)
        draw = Draw()
        while len(draw.ids) < k:
            order = self._order(self.state.epoch)
            while self.state.position < len(order) and len(draw.ids) < k:
                q = order[self.state.position]
                self.state.position += 1
                if q not in pruned and q not in draw.epochs:
                    draw.ids.append(q)
                    draw.epochs[q] = self.state.epoch
            # Pruned questions at the end of the order: this draw took the epoch's last one.
            while self.state.position < len(order) and order[self.state.position] in pruned:
                self.state.position += 1
            if self.state.position >= len(order):
                draw.ended.append(self.state.epoch)
                self.state.epoch += 1
                self.state.position = 0
        return draw

    def prune(self, question_ids: set[str]) -> None:
        self.state.pruned = sorted(set(self.state.pruned) | set(question_ids))
