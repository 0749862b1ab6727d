"""A reference to a published policy version, as the learner hands it to the rollout workers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightRef:
    """Where a published policy version lies: a safetensors file on the learner's node."""

    version: int
    path: str
    node_id: str
    # The learner actor that can send the file to a worker on another node.
    source: object = None


@dataclass(frozen=True)
class BroadcastRef:
    """A published version that stays in the learner until it is broadcast (weights.transport gloo / nccl)."""

    version: int
