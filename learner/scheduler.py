"""Which questions each step trains on: epochs over the active set, reshuffled per epoch.

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
        # The controller draws one question per group: remember the epoch's order instead of
        # reshuffling the whole set per draw. Keyed by the pruned list object (prune replaces it).
        self._cache: tuple[int, list[str], int, list[str]] | None = None

    def _order(self, epoch: int) -> list[str]:
        c = self._cache
        if c is not None and c[0] == epoch and c[1] is self.state.pruned and c[2] == len(self.state.pruned):
            return c[3]
        order = self._shuffled(epoch)
        self._cache = (epoch, self.state.pruned, len(self.state.pruned), order)
        return order

    def _shuffled(self, epoch: int) -> list[str]:
        pruned = set(self.state.pruned)
        active = [q for q in self.ids if q not in pruned]
        rng = np.random.default_rng([self.seed, epoch])
        return [active[i] for i in rng.permutation(len(active))]

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
        draw = Draw()
        while len(draw.ids) < k:
            order = self._order(self.state.epoch)
            while self.state.position < len(order) and len(draw.ids) < k:
                q = order[self.state.position]
                self.state.position += 1
                if q not in draw.epochs:
                    draw.ids.append(q)
                    draw.epochs[q] = self.state.epoch
            if self.state.position >= len(order):
                draw.ended.append(self.state.epoch)
                self.state.epoch += 1
                self.state.position = 0
        return draw

    def prune(self, question_ids: set[str]) -> None:
        self.state.pruned = sorted(set(self.state.pruned) | set(question_ids))
