"""Learning benchmark: RAPO vs GRPO from the same warm-started policy, same seed and step budget.

Runs `rapo run` twice per data seed (learner.algorithm=rapo, then grpo), collects the curves
(held-out accuracy, reward, entropy, grad norm, response length) into CSV, draws one PNG and
logs it next to both MLflow runs. The last line printed is

    rapo_acc_initial=X rapo_acc_final=Y grpo_acc_final=Z

(for the first seed; every seed's line is printed above it).

    python bench/learning.py --seeds 0 1 --steps 16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CURVES = [
    ("eval/accuracy", "held-out accuracy"),
    ("reward/mean", "reward (train batch)"),
    ("learner/entropy", "entropy"),
    ("learner/grad_norm", "grad norm"),
    ("train/response_tokens", "response tokens / episode"),
]


def run_one(out: Path, algorithm: str, seed: int, args) -> dict:
    run_dir = out / f"{algorithm}-seed{seed}"
    if (run_dir / "summary.json").exists() and not args.rerun:
        return json.loads((run_dir / "summary.json").read_text())
    cmd = [
        sys.executable, "-m", "cluster.cli", "run", args.config, "--output-dir", str(run_dir),
        f"learner.algorithm={algorithm}", f"data.seed={seed}", f"pipeline.steps={args.steps}",
        f"pipeline.eval_every={args.eval_every}", f"pipeline.seed={seed}", *args.overrides,
    ]
    print(f"== {algorithm}, data.seed={seed}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    with open(out / f"{algorithm}-seed{seed}.log", "w") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if code != 0:
        raise SystemExit(f"{algorithm} seed {seed} failed (exit {code}); see {out / f'{algorithm}-seed{seed}.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"   done in {time.time() - t0:.0f} s: accuracy {summary['accuracy_initial']} -> {summary['accuracy_final']}", flush=True)
    return summary


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    history = json.loads((run_dir / "history.json").read_text())
    out = {}
    for key, _ in CURVES:
        rows = history["evals"] if key.startswith("eval/") else history["steps"]
        out[key] = [(int(r["step"]), float(r[key])) for r in rows if key in r]
    return out


def write_csv(path: Path, data: dict[tuple[str, int], dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["algorithm", "data_seed", "metric", "step", "value"])
        for (algorithm, seed), series in sorted(data.items()):
            for key, points in series.items():
                for step, value in points:
                    w.writerow([algorithm, seed, key, step, value])


def plot(path: Path, data: dict[tuple[str, int], dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    colors = {"rapo": "tab:blue", "grpo": "tab:orange"}
    for ax, (key, label) in zip(axes, CURVES):
        for (algorithm, seed), series in sorted(data.items()):
            pts = series.get(key, [])
            if pts:
                style = "-" if seed == min(s for _, s in data) else "--"
                ax.plot(*zip(*pts), style, color=colors[algorithm], marker="o", ms=3, label=f"{algorithm.upper()} seed {seed}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle("RAPO vs GRPO on the demo world (same warm start, seed and step budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_next_to_mlflow(run_dir: Path, files: list[Path]) -> None:
    import mlflow

    summary = json.loads((run_dir / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    for f in files:
        client.log_artifact(summary["mlflow_run_id"], str(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="deploy/configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--algorithms", nargs="+", choices=["rapo", "grpo"], default=["rapo", "grpo"])
    parser.add_argument("--out", default="runs/bench-learning")
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    parser.add_argument("--collect", action="store_true", help="start no run: plot and report the finished ones")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    summaries, data = {}, {}
    for seed in args.seeds:
        for algorithm in args.algorithms:
            if args.collect and not (out / f"{algorithm}-seed{seed}" / "summary.json").exists():
                continue
            summaries[(algorithm, seed)] = run_one(out, algorithm, seed, args)
            data[(algorithm, seed)] = curves(out / f"{algorithm}-seed{seed}")
    csv_path, png_path = out / "learning_curves.csv", out / "learning_curves.png"
    write_csv(csv_path, data)
    plot(png_path, data)
    for key in summaries:
        log_next_to_mlflow(out / f"{key[0]}-seed{key[1]}", [png_path, csv_path])
    print(f"curves: {csv_path}\nplot:   {png_path}")
    lines = []
    for seed in args.seeds:
        done = [a for a in args.algorithms if (a, seed) in summaries]
        first = summaries[(done[0], seed)]
        line = f"{done[0]}_acc_initial={first['accuracy_initial']:.3f}"
        for algorithm in done:
            line += f" {algorithm}_acc_final={summaries[(algorithm, seed)]['accuracy_final']:.3f}"
        extra = ", ".join(f"{a} wall {summaries[(a, seed)]['wall_time_s']:.0f} s, replay injections "
                          f"{summaries[(a, seed)]['replay_injections']}, pruned {summaries[(a, seed)]['pruned_questions']}"
                          for a in done)
        print(f"data.seed={seed}: {line}  ({extra})")
        lines.append(line)
    print(lines[0])


if __name__ == "__main__":
    main()
