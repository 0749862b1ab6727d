"""OpenMP spin-waiting when processes share cores: libgomp's default against the GOMP_SPINCOUNT rapo sets.

On one machine a run's vLLM engine decodes while its learner trains, and the test suite runs two
runs at once. Each process's torch ops use an OpenMP team of one thread per core; between parallel
regions libgomp's idle threads spin (about 300k iterations by default) before they sleep, on cores
the other process needs. cluster/bootstrap.py ACTOR_ENV sets GOMP_SPINCOUNT for the CLI and its
actors. This measures, side by side in one run, a small-op torch loop (the shapes of a small model's
decode step) and a large matmul loop:

  alone      one process
  together   --procs processes at once (each its own OpenMP team)

under libgomp's default and under GOMP_SPINCOUNT=N, each case repeated --reps times (median kept).
The last line:

  together_speedup=X alone_ratio=Y

X = the default's together time over GOMP_SPINCOUNT's (small ops; > 1 means rapo's setting is faster
when processes share cores); Y = GOMP_SPINCOUNT's alone time over the default's (1.0 means no cost
to a process that has the cores to itself).

    python bench/omp_spin.py [--procs 2] [--spincount 300] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

# One process's work: what the child runs (`python -c`), printing its own loop time.
CHILD = """
import sys, time, torch
kind, n = sys.argv[1], int(sys.argv[2])
size = 256 if kind == "small" else 1024
a, b = torch.randn(size, size), torch.randn(size, size)
t = time.perf_counter()
for _ in range(n):
    c = a @ b
    if kind == "small":
        c = torch.softmax(c, -1)
print(time.perf_counter() - t)
"""
ITERATIONS = {"small": 4000, "large": 150}


def run_case(kind: str, procs: int, env: dict[str, str]) -> float:
    """The slowest process's loop time with `procs` of them started together."""
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, kind, str(ITERATIONS[kind])], env=env, stdout=subprocess.PIPE,
                         text=True)
        for _ in range(procs)
    ]
    try:
        return max(float(child.communicate(timeout=600)[0]) for child in children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=2, help="processes at once in the 'together' case")
    ap.add_argument("--spincount", type=int, default=300, help="GOMP_SPINCOUNT of the compared setting")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    settings = {"default": base, f"spincount={args.spincount}": {**base, "GOMP_SPINCOUNT": str(args.spincount)}}
    print(f"{os.cpu_count()} CPUs, {args.procs} processes together, median of {args.reps}", flush=True)
    results: dict[tuple[str, str, str], float] = {}
    for kind in ITERATIONS:
        for case, procs in (("alone", 1), ("together", args.procs)):
            times: dict[str, list[float]] = {name: [] for name in settings}
            for rep in range(args.reps):
                # Interleaved, so that the machine's drift falls on both settings alike.
                for name, env in settings.items():
                    times[name].append(run_case(kind, procs, env))
                    print(f"  {kind:5s} {case:8s} {name:14s} rep {rep + 1}: {times[name][-1]:.2f} s", flush=True)
            for name in settings:
                results[kind, case, name] = statistics.median(times[name])

    print(f"\n{'ops':6s} {'case':9s} " + " ".join(f"{name:>16s}" for name in settings) + "   ratio")
    for kind in ITERATIONS:
        for case in ("alone", "together"):
            row = [results[kind, case, name] for name in settings]
            print(f"{kind:6s} {case:9s} " + " ".join(f"{t:15.2f}s" for t in row) + f"   {row[0] / row[1]:.2f}x")
    spin = f"spincount={args.spincount}"
    together = results["small", "together", "default"] / results["small", "together", spin]
    alone = results["small", "alone", spin] / results["small", "alone", "default"]
    print(f"together_speedup={together:.2f} alone_ratio={alone:.2f}")


if __name__ == "__main__":
    main()
