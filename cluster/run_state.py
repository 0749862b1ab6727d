"""What a checkpoint holds of the controller and a restart restores: one dataclass, one serialisation.

The learner's own state (weights, optimiser) is DeepSpeed's checkpoint beside it; this is the
pipeline's: steps and versions done, the curves so far, the group bookkeeping that lets a resumed
run account for every admitted group, and the prompt scheduler's place in its epoch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from learner.pruning import EpochLedger
from learner.scheduler import SchedulerState

LATEST = "rapo_latest"
STATE_FILE = "controller.json"


@dataclass
class PendingGroup:
    group_id: str
    question_id: str
    epoch: int
    # Runs of this group that failed (it raised, or all its episodes failed); bounded by pipeline.max_group_reruns.
    failures: int = 0


@dataclass
class RunState:
    step: int = 0  # training steps done
    version: int = 0  # weight versions published
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    replay_injections: int = 0
    mlflow_run_id: str | None = None
    # Wall time of the runs this one continues (at a checkpoint: up to that checkpoint).
    elapsed_s: float = 0.0
    counts: Counter = field(default_factory=Counter)  # admitted / trained / dropped / reruns / duplicates (groups)
    group_counter: int = 0
    # Groups running or waiting to be re-run at the checkpoint (filled in when a checkpoint is written).
    in_flight: list[PendingGroup] = field(default_factory=list)
    pruning_epochs: EpochLedger = field(default_factory=EpochLedger)  # which epochs may be judged for pruning
    trained_group_ids: set[str] = field(default_factory=set)
    staleness: Counter = field(default_factory=Counter)  # groups per policy-version lag
    learner_restarts: int = 0
    scheduler: SchedulerState = field(default_factory=SchedulerState)
    # RAPO pruning: the epoch after which each question was pruned, and the newest epoch drawn from
    # (together: the rollouts pruning spared).
    pruned_at: dict[str, int] = field(default_factory=dict)
    last_epoch_drawn: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "version": self.version, "scheduler": asdict(self.scheduler),
            "history": self.history, "evals": self.evals, "replay_injections": self.replay_injections,
            "mlflow_run_id": self.mlflow_run_id, "elapsed_s": self.elapsed_s,
            "counts": dict(self.counts), "group_counter": self.group_counter,
            "in_flight": [asdict(g) for g in self.in_flight],
            "pruning_epochs": self.pruning_epochs.to_dict(),
            "trained_group_ids": sorted(self.trained_group_ids), "staleness": dict(self.staleness),
            "learner_restarts": self.learner_restarts, "pruned_at": self.pruned_at,
            "last_epoch_drawn": self.last_epoch_drawn,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        return cls(
            step=d["step"], version=d["version"], history=d["history"], evals=d["evals"],
            replay_injections=d["replay_injections"], mlflow_run_id=d["mlflow_run_id"], elapsed_s=d["elapsed_s"],
            counts=Counter(d["counts"]), group_counter=d["group_counter"],
            in_flight=[PendingGroup(**g) for g in d["in_flight"]],
            pruning_epochs=EpochLedger.from_dict(d["pruning_epochs"]), trained_group_ids=set(d["trained_group_ids"]),
            staleness=Counter({int(k): v for k, v in d["staleness"].items()}),
            learner_restarts=d["learner_restarts"], scheduler=SchedulerState(**d["scheduler"]),
            # Checkpoints written before pruning epochs were kept have neither: start them empty.
            pruned_at=dict(d.get("pruned_at", {})), last_epoch_drawn=d.get("last_epoch_drawn", 0),
        )

    def save(self, root: Path, tag: str) -> None:
        """Writes TAG/controller.json under `root` (the learner's checkpoint is already there), then
        moves `rapo_latest` to it: a crash before that leaves the previous checkpoint the latest."""
        (root / tag / STATE_FILE).write_text(json.dumps({"tag": tag, **self.to_dict()}))
        tmp = root / f"{LATEST}.tmp"
        tmp.write_text(tag)
        tmp.replace(root / LATEST)


def latest_tag(root: Path) -> str | None:
    """The tag `rapo_latest` names under a checkpoints folder, or None before the first checkpoint."""
    path = root / LATEST
    return path.read_text().strip() if path.exists() else None


def load_latest(root: Path) -> tuple[str, RunState]:
    """The latest checkpoint's tag and run state."""
    tag = latest_tag(root)
    if tag is None:
        raise FileNotFoundError(f"{root} holds no checkpoint ({LATEST} is missing)")
    return tag, RunState.from_dict(json.loads((root / tag / STATE_FILE).read_text()))


def checkpoint_tags(root: Path) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    return sorted(p.name for p in root.glob("step-*") if (p / STATE_FILE).exists())
