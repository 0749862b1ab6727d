"""Learning benchmark: what each RAPO part buys, at an equal budget of generated episodes.

Arms (all from the same warm-started policy of each world seed, same steps, same pool):

    grpo         learner.algorithm=grpo (no RAPO part)
    rapo         learner.algorithm=rapo (advantage scaling + replay + pruning)
    adv_scaling  grpo + learner.adv_scaling=true
    replay       grpo + learner.replay=true
    pruning      grpo + learner.pruning=true
    stage2       rapo with rewards.stage=2 (the steerable step-level reward)

GRPO and RAPO run on every world seed (``--seeds``, default 3), the other arms on the first.
Held-out accuracy is measured on ``--eval-size`` (default 128) questions at temperature 0
(greedy: the eval's only noise is which questions were drawn) every ``--eval-every`` steps.
The starting policy is evaluated once per seed; that seed's other arms reuse the step-0 eval
(the stage-2 arm excepted: it needs its own start's tool-call labels).
Per arm: mean accuracy over seeds with a 95% confidence interval (Student t over seeds when
there are two or more, else the Wilson interval of the one run's 128 answers), response
tokens and tool calls per episode, replay injections, pruned questions, and the share of
REDUNDANTSEARCH / REDUNDANTQUERY labels among the held-out episodes' tool calls before and
after; and a second table of what the parts did (mean G/G_good, injections and the staleness of
the replayed successes, the learner's importance-weight range, pruned questions and episodes saved,
tool calls per training episode at the first and last step); and RAPO minus GRPO paired question
by question on the seeds both ran (the arms share their start and held-out set, so the paired
interval is much narrower than the two arms' own). Writes learning.csv,
learning_table.md and learning_accuracy.png (held-out accuracy vs episodes generated, one line
per arm) under --out. The last line printed is

    rapo_acc_initial=X rapo_acc_final=Y grpo_acc_final=Z rapo_ci=W grpo_ci=V

(means over seeds; W and V are 95% CI half-widths of the final accuracies).

The full set (3 seeds x 2 arms + 4 single-seed arms at 512 episodes each) takes hours on 2
cores; pick what to run with --arms / --seeds / --episodes.

    python bench/learning.py                                  # everything
    python bench/learning.py --arms rapo grpo --seeds 0 --episodes 128 --eval-every 4
    python bench/learning.py --collect                        # table + plot of finished runs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Overrides of each arm on top of the config; single-part arms start from GRPO and switch one part on.
ARMS: dict[str, tuple[str, ...]] = {
    "grpo": ("learner.algorithm=grpo",),
    "rapo": ("learner.algorithm=rapo",),
    "adv_scaling": ("learner.algorithm=grpo", "learner.adv_scaling=true"),
    "replay": ("learner.algorithm=grpo", "learner.replay=true"),
    "pruning": ("learner.algorithm=grpo", "learner.pruning=true"),
    "stage2": ("learner.algorithm=rapo", "rewards.stage=2"),
}
MULTI_SEED_ARMS = ("grpo", "rapo")
# Settings of every run, before the command line's overrides. The demo config draws 4 questions x
# 2 samples and prunes at a solve rate of 0.5, so that replay and pruning show within its 5 steps.
# On the benchmark's pool of 8, seed 0, lr 1e-5, 64 episodes, that shape unlearned tool calls:
# GRPO's held-out accuracy went 0.414 -> 0.000 and RAPO's 0.414 -> 0.242, likely because with 2
# samples a format-only difference (a wrong answer given at once earns 0.1, running out of tool
# calls 0) gets as large a normalised advantage as a correct answer. With 2 x 4 both ended at 0.445, so
# the benchmark keeps 4 samples a question and prunes at the paper's 0.9. Over 128 episodes GRPO
# collapsed the same way at 2 x 4 (0.414 -> 0.000) while RAPO, its replay injecting from step 8, held
# (0.469; README, Benchmarks).
BENCH_SETTINGS = ("pipeline.mode=sync", "pipeline.questions_per_step=2", "pipeline.samples_per_question=4",
                  "learner.prune_threshold=0.9")
# Every arm of a world seed starts from the same warm-started policy, so one run per seed evaluates
# it at step 0 (a finished run of an earlier bench in the same --out counts) and the others reuse
# that eval (a 128-question greedy eval is ~3.5 min on 2 cores).
# The stage-2 arm evaluates its own start: only stage 2 labels the eval's tool calls, and its
# "before" label shares need those labels.
OWN_INITIAL_EVAL_ARMS = ("stage2",)
REDUNDANT_LABELS = ("REDUNDANTSEARCH", "REDUNDANTQUERY")
# Two-sided 95% Student t quantiles by degrees of freedom (beyond 30 the normal's 1.96 is close enough).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def expand_arms(arms: list[str], seeds: list[int]) -> list[RunSpec]:
    """One run per (arm, seed): GRPO and RAPO on every seed, single-part and stage-2 arms on the first.

    Seed by seed, so that a bench stopped part-way has whole seeds (every arm of the first seed,
    then GRPO and RAPO of the next), not one arm's seeds without the other's.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not seeds:
        raise ValueError("give at least one world seed")
    return [RunSpec(a, s, ARMS[a]) for s in seeds for a in arms if a in MULTI_SEED_ARMS or s == seeds[0]]


def initial_eval_sources(specs: list[RunSpec]) -> dict[RunSpec, RunSpec | None]:
    """For each run, the earlier run of its seed whose step-0 eval it reuses; None: it evaluates its start."""
    first: dict[int, RunSpec] = {}
    out: dict[RunSpec, RunSpec | None] = {}
    for spec in specs:
        if spec.arm in OWN_INITIAL_EVAL_ARMS or spec.seed not in first:
            out[spec] = None
            if spec.arm not in OWN_INITIAL_EVAL_ARMS:
                first[spec.seed] = spec
        else:
            out[spec] = first[spec.seed]
    return out


def with_initial_eval(run: dict, source: dict) -> dict:
    """A run that skipped its step-0 eval, completed with ``source``'s (the same starting policy's)."""
    if run["acc_initial"] is not None:
        return run
    return {**run, "acc_initial": source["acc_initial"], "curve": [source["curve"][0], *run["curve"]],
            **{f"{lab}_before": source[f"{lab}_before"] for lab in REDUNDANT_LABELS}}


def fill_initial_evals(results: dict[RunSpec, dict], starts: dict[int, dict]) -> dict[RunSpec, dict]:
    """Every run that skipped its step-0 eval, completed with the start of its seed (``starts``: a stage-1
    run of that seed that evaluated its own start; they all start from the same policy). Which run made it
    does not matter, so runs added to an out folder later, or named in another order, still pair up."""
    out = {}
    for spec, run in results.items():
        if run["acc_initial"] is None:
            if spec.seed not in starts:
                raise SystemExit(f"{spec.name} has no step-0 eval and no run of seed {spec.seed} made one; run "
                                 f"grpo or rapo on that seed too, or --rerun {spec.name}'s arm alone")
            run = with_initial_eval(run, starts[spec.seed])
        out[spec] = run
    return out


def steps_for_budget(episodes: int, questions_per_step: int, samples_per_question: int) -> int:
    """Training steps that generate at least ``episodes`` episodes (every step generates a full batch)."""
    if episodes < 1:
        raise ValueError("the episode budget must be at least 1")
    return math.ceil(episodes / (questions_per_step * samples_per_question))


def t_quantile(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    known = [d for d in T95 if d <= df]
    return T95[max(known)] if df <= 30 else 1.96


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and 1, unlike p +- 1.96 se)."""
    if n <= 0:
        raise ValueError("no questions evaluated")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # min/max: at p = 0 or 1 the bound equals p exactly, which rounding would otherwise nudge past it.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def mean_ci(accuracies: list[float], n_questions: int) -> tuple[float, float]:
    """Mean accuracy over seeds and the half-width of its 95% CI.

    Two or more seeds: a t interval over the per-seed accuracies (it holds world-to-world and
    eval noise). One seed: half the Wilson interval of its ``n_questions`` answers.
    """
    if not accuracies:
        raise ValueError("no accuracies")
    k = len(accuracies)
    mean = sum(accuracies) / k
    if k == 1:
        lo, hi = wilson_interval(round(mean * n_questions), n_questions)
        return mean, (hi - lo) / 2
    sd = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (k - 1))
    return mean, t_quantile(k - 1) * sd / math.sqrt(k)


def paired_difference(a: dict[str, bool], b: dict[str, bool]) -> tuple[float, float, int, int]:
    """Accuracy of ``a`` minus ``b`` on the questions both answered ({question id: correct}), with the
    half-width of its 95% CI, and the discordant counts (a right and b wrong, b right and a wrong).

    Arms of one seed start from the same policy and answer the same held-out questions, so the
    question-by-question difference cancels which questions were drawn: its interval is far
    narrower than the gap between two arms' own intervals. It holds the eval's sampling of questions
    only, not how differently training could have gone (only more seeds measure that). Wald interval
    of a paired difference of proportions; pool seeds by concatenating their (seed-prefixed) ids.
    """
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two runs answered no question in common")
    n = len(shared)
    a_only = sum(1 for q in shared if a[q] and not b[q])
    b_only = sum(1 for q in shared if b[q] and not a[q])
    diff = (a_only - b_only) / n
    var = max((a_only + b_only) / n - diff**2, 0.0) / n
    return diff, 1.96 * math.sqrt(var), a_only, b_only


def paired_line(results: dict[RunSpec, dict], arm: str = "rapo", baseline: str = "grpo") -> str | None:
    """``arm`` against ``baseline`` on the final eval, paired question by question over the seeds both ran."""
    seeds = {s.seed for s in results if s.arm == arm} & {s.seed for s in results if s.arm == baseline}

    def pooled(name: str) -> dict[str, bool]:
        return {f"{spec.seed}/{q}": ok for spec, r in results.items() if spec.arm == name
                and spec.seed in seeds for q, ok in r.get("final_correct", {}).items()}

    a, b = pooled(arm), pooled(baseline)
    if not seeds or not (set(a) & set(b)):
        return None
    diff, ci, a_only, b_only = paired_difference(a, b)
    return (f"{arm} - {baseline}, final held-out accuracy paired on the same questions over {len(seeds)} "
            f"seed{'s' * (len(seeds) > 1)}: {diff:+.3f} ± {ci:.3f} (95% CI; {a_only} questions only {arm} "
            f"answered, {b_only} only {baseline}, of {len(set(a) & set(b))})")


def label_shares(rows: list[dict]) -> dict[str, float]:
    """Share of each label among all tool-call labels of some eval rows ({"labels": [...]} each)."""
    counts: dict[str, int] = {}
    for r in rows:
        for label in r.get("labels", []):
            counts[label] = counts.get(label, 0) + 1
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def parts_at_work(steps: list[dict]) -> dict[str, float]:
    """What RAPO's parts did over one run's steps (history.json's per-step metrics): the mean advantage
    scale G/G_good, the mean staleness of replayed successes where any were injected, the range of the
    learner's importance weights, and tool calls per training episode at the first and the last step
    (a policy that unlearns tool use shows it here first)."""
    nan = float("nan")
    def col(key: str) -> list[float]:
        return [float(s[key]) for s in steps if key in s]
    scale, weights, calls = col("rapo/scale_factor"), col("learner/is_weight"), col("train/tool_calls_per_episode")
    stale = [float(s["rapo/replay_staleness"]) for s in steps if s.get("rapo/injections", 0) > 0
             and "rapo/replay_staleness" in s]
    return {
        "scale_mean": sum(scale) / len(scale) if scale else nan,
        "replay_staleness": sum(stale) / len(stale) if stale else nan,
        "is_weight_min": min(weights) if weights else nan, "is_weight_max": max(weights) if weights else nan,
        "tool_calls_first": calls[0] if calls else nan, "tool_calls_last": calls[-1] if calls else nan,
    }


PART_KEYS = ("scale_mean", "replay_staleness", "is_weight_min", "is_weight_max", "tool_calls_first",
             "tool_calls_last", "episodes_saved")


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def arm_rows(results: dict[RunSpec, dict]) -> list[dict]:
    """One row per arm: means over its seeds (final accuracy with a CI) and the per-episode costs."""
    rows = []
    for arm in dict.fromkeys(spec.arm for spec in results):
        runs = [r for spec, r in results.items() if spec.arm == arm]
        final, ci = mean_ci([r["acc_final"] for r in runs], runs[0]["eval_questions"])
        def mean(key, runs=runs):
            return sum(r[key] for r in runs) / len(runs)

        rows.append({
            "arm": arm, "seeds": len(runs), "episodes": mean("episodes"), "acc_initial": mean("acc_initial"),
            "acc_final": final, "ci": ci, "gain": final - mean("acc_initial"),
            "response_tokens": mean("response_tokens"), "tool_calls": mean("tool_calls"),
            "replay_injections": mean("replay_injections"), "pruned_questions": mean("pruned_questions"),
            **{f"{label}_before": mean(f"{label}_before") for label in REDUNDANT_LABELS},
            **{f"{label}_after": mean(f"{label}_after") for label in REDUNDANT_LABELS},
            # A run where a part never acted (no injection) leaves it out of that part's mean.
            **{key: _nanmean([r.get(key, float("nan")) for r in runs]) for key in PART_KEYS},
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| arm | seeds | episodes | held-out acc. initial | final (95% CI) | gain | response tokens / ep. "
            "| tool calls / ep. | replay injections | pruned | REDUNDANTSEARCH before -> after "
            "| REDUNDANTQUERY before -> after |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        shares = [f"{r[f'{lab}_before']:.3f} -> {r[f'{lab}_after']:.3f}" for lab in REDUNDANT_LABELS]
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['episodes']:.0f} | {r['acc_initial']:.3f} | "
            f"{r['acc_final']:.3f} ± {r['ci']:.3f} | {r['gain']:+.3f} | {r['response_tokens']:.0f} | "
            f"{r['tool_calls']:.2f} | {r['replay_injections']:.1f} | {r['pruned_questions']:.1f} | "
            f"{shares[0]} | {shares[1]} |"
        )
    return "\n".join(lines)


def parts_table(rows: list[dict]) -> str:
    """What each arm's parts did (means over seeds; "-" where a part never acted)."""
    def f(v: float, fmt: str) -> str:
        return "-" if math.isnan(v) else format(v, fmt)

    head = ("| arm | G/G_good (mean) | replay injections | replay staleness (versions) | importance weight min..max "
            "| pruned | episodes saved by pruning | tool calls / ep. first step -> last |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        weights = "-" if math.isnan(r["is_weight_min"]) else f"{r['is_weight_min']:.3f}..{r['is_weight_max']:.3f}"
        lines.append(
            f"| {r['arm']} | {f(r['scale_mean'], '.2f')} | {r['replay_injections']:.1f} | "
            f"{f(r['replay_staleness'], '.1f')} | {weights} | "
            f"{r['pruned_questions']:.1f} | {f(r['episodes_saved'], '.0f')} | "
            f"{f(r['tool_calls_first'], '.2f')} -> {f(r['tool_calls_last'], '.2f')} |"
        )
    return "\n".join(lines)


def last_line(rows: list[dict]) -> str:
    by_arm = {r["arm"]: r for r in rows}
    rapo, grpo = by_arm.get("rapo"), by_arm.get("grpo")
    nan = float("nan")
    return (f"rapo_acc_initial={rapo['acc_initial'] if rapo else nan:.3f} "
            f"rapo_acc_final={rapo['acc_final'] if rapo else nan:.3f} "
            f"grpo_acc_final={grpo['acc_final'] if grpo else nan:.3f} "
            f"rapo_ci={rapo['ci'] if rapo else nan:.3f} grpo_ci={grpo['ci'] if grpo else nan:.3f}")


# ---- running and reading runs (I/O) ---------------------------------------------------------------
def run_one(out: Path, spec: RunSpec, steps: int, args, eval_at_start: bool = True) -> Path:
    run_dir = out / spec.name
    if (run_dir / "summary.json").exists() and not args.rerun:
        return run_dir
    # An unfinished (interrupted) run starts over: a new run in its folder would find its Redis state.
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "cluster.cli", "run", args.config, "--output-dir", str(run_dir), *spec.overrides,
        f"pipeline.eval_at_start={str(eval_at_start).lower()}",
        f"data.seed={spec.seed}", f"pipeline.seed={spec.seed}", f"pipeline.steps={steps}",
        f"pipeline.eval_every={args.eval_every}", f"data.eval_size={args.eval_size}",
        f"pipeline.eval_temperature={args.eval_temperature}", f"data.train_size={args.train_size}",
        *BENCH_SETTINGS, *args.overrides,
    ]
    print(f"== {spec.name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    with open(out / f"{spec.name}.log", "w") as log:
        code = run_to_the_end(cmd, log, spec.name)
    if code != 0:
        raise SystemExit(f"{spec.name} failed (exit {code}); see {out / f'{spec.name}.log'}")
    print(f"   done in {time.time() - t0:.0f} s", flush=True)
    if not args.keep_checkpoints:
        drop_weights(run_dir)
    return run_dir


def finished_starts(out: Path, seeds: list[int]) -> dict[int, str]:
    """Per seed, a finished stage-1 run under ``out`` (any arm, from any earlier bench) that evaluated its start."""
    found = {}
    for seed in seeds:
        for arm in ARMS:
            summary = out / f"{arm}-seed{seed}" / "summary.json"
            if arm not in OWN_INITIAL_EVAL_ARMS and summary.exists() \
                    and json.loads(summary.read_text()).get("accuracy_initial") is not None:
                found[seed] = summary.parent.name
                break
    return found


# What a finished run keeps on disk is read from summary.json, history.json and eval/ alone; the
# DeepSpeed checkpoints and the exported policy are ~2.7 GB a run (~27 GB for the full set).
WEIGHT_DIRS = ("checkpoints", "policy")


def drop_weights(run_dir: Path) -> None:
    for name in WEIGHT_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _run_child_signals() -> None:
    """In the run's process before exec: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt even where the bench was started with it ignored (a non-interactive shell's
    `cmd &`, nohup scripts), and SIGTERM when the bench dies."""
    from cluster.parent_death import term_on_parent_death

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    term_on_parent_death()


def run_to_the_end(cmd: list[str], log, name: str) -> int:
    """Run one CLI run; on Ctrl-C (or SIGTERM to the bench) let it tear down its cluster, then stop.

    The run gets its own session, so a terminal's Ctrl-C reaches the bench alone and the run sees
    exactly one SIGINT, from here (subprocess.call would SIGKILL it 0.25 s after the interrupt,
    mid tear-down); if the bench is killed outright, the kernel sends the run SIGTERM.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                            start_new_session=True, preexec_fn=_run_child_signals)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print(f"   interrupted: stopping {name} (its Ray cluster and Redis go with it) ...", flush=True)
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise SystemExit(f"interrupted during {name}; finished runs are kept: the same command goes on from the "
                         f"first unfinished one") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_run(run_dir: Path, batch: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    evals = history["evals"]
    files = sorted((run_dir / "eval").glob("step-*.jsonl"))
    def rows(f: Path) -> list[dict]:
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    # Without a step-0 eval (a run reusing another's) the "before" shares come from that run.
    before = label_shares(rows(files[0])) if files and files[0].name == "step-0000.jsonl" else {}
    final_rows = rows(files[-1]) if files else []
    after = label_shares(final_rows)
    steps = history["steps"]
    mean = lambda key: sum(s.get(key, 0.0) for s in steps) / len(steps) if steps else 0.0  # noqa: E731
    return {
        "acc_initial": summary["accuracy_initial"], "acc_final": summary["accuracy_final"],
        "eval_questions": summary["eval_questions"], "episodes": summary["steps"] * batch,
        "response_tokens": mean("train/response_tokens"), "tool_calls": mean("train/tool_calls_per_episode"),
        "replay_injections": summary["replay_injections"], "pruned_questions": summary["pruned_questions"],
        "curve": [(int(e["step"]) * batch, float(e["eval/accuracy"])) for e in evals],
        "episodes_saved": float(summary.get("episodes_saved_by_pruning", 0)), **parts_at_work(steps),
        "final_correct": {r["id"]: bool(r["correct"]) for r in final_rows},
        **{f"{lab}_before": before.get(lab, 0.0) for lab in REDUNDANT_LABELS},
        **{f"{lab}_after": after.get(lab, 0.0) for lab in REDUNDANT_LABELS},
    }


def plot(path: Path, results: dict[RunSpec, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in dict.fromkeys(spec.arm for spec in results):
        curves = [r["curve"] for spec, r in results.items() if spec.arm == arm]
        xs = sorted({x for c in curves for x, _ in c})
        ys = [sum(dict(c).get(x, float("nan")) for c in curves) / len(curves) for x in xs]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{arm} ({len(curves)} seed{'s' * (len(curves) > 1)})")
    ax.set_xlabel("episodes generated")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("RAPO parts at an equal episode budget (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: Path, results: dict[RunSpec, dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arm", "seed", "episodes", "heldout_accuracy"])
        for spec, r in results.items():
            for episodes, acc in r["curve"]:
                w.writerow([spec.arm, spec.seed, episodes, acc])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="deploy/configs/demo.yaml")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world seeds (data.seed)")
    parser.add_argument("--episodes", type=int, default=512, help="generated episodes per run (equal for every arm)")
    parser.add_argument("--train-size", type=int, default=64, help="RL pool (data.train_size), mixed 1/2-hop")
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--eval-temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--out", default="runs/bench-learning")
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished run's checkpoints/ and policy/ (about 2.7 GB a run)")
    parser.add_argument("--collect", action="store_true", help="start no run: table and plot of the finished ones")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = parser.parse_args()

    from cluster.config import load_config

    cfg = load_config(REPO / args.config, [*BENCH_SETTINGS, *args.overrides])
    p = cfg.pipeline
    batch = p.questions_per_step * p.samples_per_question
    steps = steps_for_budget(args.episodes, p.questions_per_step, p.samples_per_question)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = expand_arms(args.arms, args.seeds)
    print(f"{len(specs)} runs of {steps} steps ({steps * batch} episodes each); held-out {args.eval_size} questions "
          f"at T={args.eval_temperature}", flush=True)
    sources = initial_eval_sources(specs)
    # --rerun starts every run over, its start eval included.
    on_disk = {} if args.rerun else finished_starts(out, args.seeds)
    starts = {seed: read_run(out / name, batch) for seed, name in on_disk.items()}
    results: dict[RunSpec, dict] = {}
    for spec in specs:
        if args.collect and not (out / spec.name / "summary.json").exists():
            continue
        own_start = sources[spec] is None and (spec.arm in OWN_INITIAL_EVAL_ARMS or spec.seed not in starts)
        results[spec] = run = read_run(run_one(out, spec, steps, args, eval_at_start=own_start), batch)
        if spec.arm not in OWN_INITIAL_EVAL_ARMS and run["acc_initial"] is not None:
            starts.setdefault(spec.seed, run)
    if not results:
        raise SystemExit(f"no finished runs under {out}")
    results = fill_initial_evals(results, starts)
    rows = arm_rows(results)
    table = markdown_table(rows) + "\n\nWhat the parts did:\n\n" + parts_table(rows)
    paired = paired_line(results)
    if paired:
        table += "\n\n" + paired
    (out / "learning_table.md").write_text(table + "\n")
    write_csv(out / "learning.csv", results)
    plot(out / "learning_accuracy.png", results)
    print(table)
    print(f"table: {out / 'learning_table.md'}\nplot:  {out / 'learning_accuracy.png'}")
    print(last_line(rows))


if __name__ == "__main__":
    main()
