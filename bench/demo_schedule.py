"""How often RAPO's replay and pruning act within a short run, by Monte Carlo over its schedule.

A run of a few steps shows replay and pruning only if the draw cooperates: replay needs a
question solved once and an all-fail group of it later; pruning needs a question solved at
>= prune_threshold in one epoch. This simulates a run's schedule with the controller's own
pieces (`PromptScheduler`; `EpochLedger`, which judges an epoch only once all its groups are
scored; `questions_to_prune`, capped at `active - questions_per_step`), drawing the next step
before the current one is scored as a synchronous run does. Per-episode success rates are
drawn for each question: 1-hop questions uniform in [--lo, --hi] and rising by --slope a step,
2-hop ones in [0, 0.06] (`Rates`).
It is how deploy/configs/demo.yaml was shaped; it models no learning beyond the slope.

    python bench/demo_schedule.py                         # the demo's shape and some others
    python bench/demo_schedule.py --trials 4000 --lo 0.05 --hi 0.25 --slope 0

The last line is `demo_p_both=X` for the demo config's shape at the given rates.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner.advantages import questions_to_prune  # noqa: E402
from learner.pruning import EpochLedger  # noqa: E402
from learner.scheduler import Draw, PromptScheduler  # noqa: E402


@dataclass(frozen=True)
class Shape:
    train_size: int
    questions_per_step: int
    samples_per_question: int
    steps: int
    prune_threshold: float

    def label(self) -> str:
        return (f"pool {self.train_size}, {self.questions_per_step} q x {self.samples_per_question} samples, "
                f"{self.steps} steps, prune at {self.prune_threshold}")


@dataclass(frozen=True)
class Rates:
    lo: float = 0.1
    hi: float = 0.3
    slope: float = 0.01
    two_hop_lo: float = 0.0
    two_hop_hi: float = 0.06


def simulate(shape: Shape, rates: Rates, rng: np.random.Generator) -> tuple[int, int]:
    """One run: (groups that got a stored success injected, questions pruned)."""
    ids = [f"q{i}" for i in range(shape.train_size)]
    one_hop = set(ids[: (shape.train_size + 1) // 2])  # mixed_hops_subset puts 1-hop first on odd sizes
    base = {q: rng.uniform(rates.lo, rates.hi) if q in one_hop else rng.uniform(rates.two_hop_lo, rates.two_hop_hi)
            for q in ids}
    sched = PromptScheduler(ids, seed=int(rng.integers(1 << 30)))
    # The controller's bookkeeping: which epochs may be judged, and per-epoch counts of each question.
    ledger = EpochLedger()
    totals: dict[int, Counter] = defaultdict(Counter)
    corrects: dict[int, Counter] = defaultdict(Counter)
    stored: set[str] = set()
    pruned: set[str] = set()
    injections = 0

    def draw(step: int) -> Draw | None:
        if sched.active < shape.questions_per_step:
            return None
        d = sched.next_batch(shape.questions_per_step)
        for q in d.ids:
            ledger.drawn(d.epochs[q], f"g{step}-{q}", d.ended)
        return d

    upcoming = draw(1)
    for step in range(1, shape.steps + 1):
        current, upcoming = upcoming, draw(step + 1)
        if current is None:
            break
        for q in current.ids:
            epoch = current.epochs[q]
            p = min(1.0, base[q] + rates.slope * step)
            solved = int((rng.random(shape.samples_per_question) < p).sum())
            if solved == 0 and q in stored:
                injections += 1
            if solved:
                stored.add(q)
            totals[epoch][q] += shape.samples_per_question
            corrects[epoch][q] += solved
            ledger.settle(epoch, f"g{step}-{q}")
            for e in ledger.closable():
                new = questions_to_prune(corrects[e], totals[e], shape.prune_threshold,
                                         max_prune=sched.active - shape.questions_per_step)
                pruned |= new
                sched.prune(new)
                ledger.closed(e)
    return injections, len(pruned)


def chances(shape: Shape, rates: Rates, trials: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    runs = [simulate(shape, rates, rng) for _ in range(trials)]
    inj = np.array([i > 0 for i, _ in runs])
    pru = np.array([p > 0 for _, p in runs])
    return {"replay": float(inj.mean()), "pruning": float(pru.mean()), "both": float((inj & pru).mean()),
            "mean_injections": float(np.mean([i for i, _ in runs]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="deploy/configs/demo.yaml")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--lo", type=float, default=0.1, help="lowest 1-hop per-episode success rate")
    parser.add_argument("--hi", type=float, default=0.3, help="highest 1-hop per-episode success rate")
    parser.add_argument("--slope", type=float, default=0.01, help="rise of each rate per step")
    args = parser.parse_args()

    from cluster.config import load_config

    cfg = load_config(Path(args.config), [])
    demo = Shape(cfg.data.train_size or 64, cfg.pipeline.questions_per_step, cfg.pipeline.samples_per_question,
                 cfg.pipeline.steps, cfg.learner.prune_threshold)
    rates = Rates(args.lo, args.hi, args.slope)
    others = [Shape(4, 2, 4, demo.steps, 0.75), Shape(demo.train_size, demo.questions_per_step,
              demo.samples_per_question, demo.steps, 0.9), Shape(5, 3, 3, demo.steps, 0.6)]
    print(f"1-hop success rates {rates.lo}-{rates.hi}, +{rates.slope}/step; {args.trials} runs each")
    for shape in others + [demo]:
        c = chances(shape, rates, args.trials)
        print(f"  {shape.label():55s} replay {c['replay']:.2f}  pruning {c['pruning']:.2f}  both {c['both']:.2f}"
              f"  (mean injections {c['mean_injections']:.1f})")
    print(f"demo_p_both={c['both']:.2f}")


if __name__ == "__main__":
    main()
