"""A learner that only takes time: the latency-model counterpart of learner.trainer.Trainer.

Used by the pipeline benchmark to put a GPU-scale training step (``step_s``) into the real
pipeline (Ray actors, Redis stream, weight publication, checkpoints) without the compute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from learner.batch import RankPlan


class SimulatedTrainer:
    gpu = False

    def __init__(self, step_s: float, rank: int = 0):
        self.step_s = step_s
        self.rank = rank
        self.version = 0

    def train_step(self, plan: RankPlan) -> dict[str, float]:
        t0 = time.perf_counter()
        time.sleep(self.step_s)
        tokens = float(sum(s.loss_tokens for mb in plan.mini_batches for s in mb.samples))
        self.version += 1
        sums = dict.fromkeys(
            ("loss", "pg_loss", "kl", "entropy", "clip_frac", "ratio", "is_weight", "prox_behaviour_abs_diff"), 0.0
        )
        sums.update(tokens=tokens, grad_norm=0.0, train_time_s=time.perf_counter() - t0)
        return sums

    def export_weights(self, path: Path, dtype: str) -> int:
        if self.rank != 0:
            return 0
        import torch
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"version": torch.tensor([self.version])}, str(path))
        return 1

    def save_checkpoint(self, directory: Path, tag: str) -> None:
        (directory / tag).mkdir(parents=True, exist_ok=True)
        (directory / tag / f"sim-rank{self.rank}.json").write_text(json.dumps({"version": self.version}))

    def load_checkpoint(self, directory: Path, tag: str) -> None:
        self.version = json.loads((directory / tag / f"sim-rank{self.rank}.json").read_text())["version"]

    def close(self) -> None:
        return None
