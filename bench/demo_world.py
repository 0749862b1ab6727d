"""Demo-world benchmark: how long `build_demo_world` takes, for a few seeds side by side in one run.

It prints each world's build time and size. What the world must satisfy (names, splits, plans,
search ranking the plan page first mostly but not always) is asserted in tests/unit/test_demo_world.py.

    python bench/demo_world.py --seeds 11 12 13 --countries 120
"""

from __future__ import annotations

import argparse
import statistics
import time

from rollout.demo_world import build_demo_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    ap.add_argument("--countries", type=int, default=120)
    args = ap.parse_args()
    times = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        world = build_demo_world(seed, args.countries)
        times.append(time.perf_counter() - t0)
        print(f"seed {seed}: built in {times[-1]:.3f} s, {len(world.documents)} documents, "
              f"{len(world.warm_start)}/{len(world.train)}/{len(world.heldout)} warm-start/train/held-out questions")
    print(f"build_demo_world(seed, {args.countries}): median {statistics.median(times):.3f} s over {len(times)} seeds")


if __name__ == "__main__":
    main()
