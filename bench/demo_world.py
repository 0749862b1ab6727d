"""Demo-world benchmark: how long `build_demo_world` takes and how well search finds the plan pages.

For a few seeds (each world built once, side by side in one run) it prints the build time, the
world's size, and the share of plan hops whose page search ranks first and in the top three.
The tests in tests/unit/test_demo_world.py assert the search rates; this only reports them.

    python bench/demo_world.py --seeds 11 12 13 --countries 120
"""

from __future__ import annotations

import argparse
import statistics
import time

from rollout.demo_world import build_demo_world
from rollout.tools.corpus import CorpusBackend


def search_rates(world) -> tuple[int, float, float]:
    """(plan hops, top-1 rate, top-3 rate) of the corpus search for each hop's query."""
    backend = CorpusBackend(world.documents)
    hops = {(h.query, h.url) for plan in world.plans.values() for h in plan}
    top1 = top3 = 0
    for query, url in sorted(hops):
        urls = [backend.documents[i].url for i in backend.search_indices(query, 3)]
        top1 += urls[0] == url
        top3 += url in urls
    return len(hops), top1 / len(hops), top3 / len(hops)


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
        hops, rate1, rate3 = search_rates(world)
        print(f"seed {seed}: built in {times[-1]:.3f} s, {len(world.documents)} documents, "
              f"{len(world.warm_start)}/{len(world.train)}/{len(world.heldout)} warm-start/train/held-out questions; "
              f"search over {hops} plan hops: top-1 {rate1:.3f}, top-3 {rate3:.3f}")
    print(f"build_demo_world(seed, {args.countries}): median {statistics.median(times):.3f} s over {len(times)} seeds")


if __name__ == "__main__":
    main()
