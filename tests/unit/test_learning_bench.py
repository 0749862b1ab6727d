"""The learning benchmark's pure parts: arms, episode budget, confidence intervals, the table."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.learning import (
    ARMS,
    WEIGHT_DIRS,
    arm_rows,
    drop_weights,
    expand_arms,
    fill_initial_evals,
    finished_starts,
    initial_eval_sources,
    label_shares,
    last_line,
    markdown_table,
    mean_ci,
    paired_difference,
    paired_line,
    parts_at_work,
    parts_table,
    read_run,
    steps_for_budget,
    wilson_interval,
    with_initial_eval,
)


def test_grpo_and_rapo_run_every_seed_single_parts_the_first():
    specs = expand_arms(list(ARMS), [3, 4, 5])
    by_arm = {a: [s.seed for s in specs if s.arm == a] for a in ARMS}
    assert by_arm["grpo"] == by_arm["rapo"] == [3, 4, 5]
    assert by_arm["adv_scaling"] == by_arm["replay"] == by_arm["pruning"] == by_arm["stage2"] == [3]
    assert len({s.name for s in specs}) == len(specs)
    # Seed by seed: every arm of the first seed before the next seed's.
    assert [s.seed for s in specs] == sorted(s.seed for s in specs)


def test_single_part_arms_switch_exactly_one_part_on_top_of_grpo():
    from cluster.config import load_config

    for part in ("adv_scaling", "replay", "pruning"):
        lc = load_config(None, list(ARMS[part])).learner
        assert {p: lc.feature(p) for p in ("adv_scaling", "replay", "pruning")} == {
            p: p == part for p in ("adv_scaling", "replay", "pruning")}
    assert load_config(None, list(ARMS["stage2"])).rewards.stage == 2


def test_unknown_arm_and_no_seed_are_refused():
    with pytest.raises(ValueError, match="unknown arm"):
        expand_arms(["dapo"], [0])
    with pytest.raises(ValueError, match="seed"):
        expand_arms(["rapo"], [])


@given(st.integers(1, 5000), st.integers(1, 16), st.integers(2, 8))
def test_budget_steps_cover_the_budget_by_less_than_one_batch(episodes, q, n):
    steps = steps_for_budget(episodes, q, n)
    assert steps * q * n >= episodes > (steps - 1) * q * n


def test_wilson_interval_known_values():
    # 64/128 correct: 0.5 +- 0.0851 (the textbook Wilson interval, z = 1.96).
    lo, hi = wilson_interval(64, 128)
    assert lo == pytest.approx(0.4149, abs=1e-3) and hi == pytest.approx(0.5851, abs=1e-3)
    lo, hi = wilson_interval(0, 128)
    assert lo == 0.0 and 0.02 < hi < 0.04  # never a zero-width interval at the edge


@given(st.integers(0, 200), st.integers(1, 200))
def test_wilson_interval_contains_the_estimate(correct, n):
    correct = min(correct, n)
    lo, hi = wilson_interval(correct, n)
    assert 0.0 <= lo <= correct / n <= hi <= 1.0


def test_mean_ci_over_seeds_is_a_t_interval():
    mean, half = mean_ci([0.5, 0.6, 0.7], 128)
    # sd = 0.1, t(2) = 4.303: half-width 4.303 * 0.1 / sqrt(3).
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert mean_ci([0.6, 0.6, 0.6], 128)[1] == 0.0
    one_mean, one_half = mean_ci([0.5], 128)
    assert one_mean == 0.5 and one_half == pytest.approx(0.0851, abs=1e-3)


def test_label_shares():
    rows = [{"labels": ["UNIQUESEARCH", "REDUNDANTSEARCH"]}, {"labels": ["EXPLORATION", "REDUNDANTSEARCH"]}, {}]
    assert label_shares(rows) == {"UNIQUESEARCH": 0.25, "REDUNDANTSEARCH": 0.5, "EXPLORATION": 0.25}
    assert label_shares([{"labels": []}]) == {}


def _run(acc0, acc1, **kw):
    base = {"acc_initial": acc0, "acc_final": acc1, "eval_questions": 128, "episodes": 256, "response_tokens": 300.0,
            "tool_calls": 2.0, "replay_injections": 3, "pruned_questions": 1, "REDUNDANTSEARCH_before": 0.1,
            "REDUNDANTSEARCH_after": 0.05, "REDUNDANTQUERY_before": 0.2, "REDUNDANTQUERY_after": 0.1}
    return {**base, **kw}


def test_arm_rows_table_and_last_line():
    specs = expand_arms(["rapo", "grpo", "replay"], [0, 1])
    results = {s: _run(0.5, 0.7 if s.arm == "rapo" else 0.6, tool_calls=3.0 if s.seed else 1.0) for s in specs}
    rows = arm_rows(results)
    assert [r["arm"] for r in rows] == ["rapo", "grpo", "replay"]
    rapo = rows[0]
    assert rapo["seeds"] == 2 and rapo["acc_final"] == pytest.approx(0.7) and rapo["ci"] == 0.0
    assert rapo["gain"] == pytest.approx(0.2) and rapo["tool_calls"] == 2.0
    assert rows[2]["seeds"] == 1 and rows[2]["ci"] > 0.05  # one seed: Wilson on 128 answers
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "| rapo | 2 | 256 | 0.500 | 0.700 ± 0.000 | +0.200 |" in table
    assert "0.100 -> 0.050" in table
    line = last_line(rows)
    assert line.startswith("rapo_acc_initial=0.500 rapo_acc_final=0.700 grpo_acc_final=0.600 rapo_ci=0.000 ")
    assert line.split()[-1].startswith("grpo_ci=")


@given(st.lists(st.sampled_from(list(ARMS)), min_size=1, max_size=6, unique=True),
       st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
def test_each_seed_evaluates_its_start_once_and_stage2_its_own(arms, seeds):
    specs = expand_arms(arms, seeds)
    sources = initial_eval_sources(specs)
    for seed in {s.seed for s in specs}:
        stage1 = [s for s in specs if s.seed == seed and s.arm != "stage2"]
        own = [s for s in stage1 if sources[s] is None]
        # The seed's first stage-1 run evaluates the start, and every later one reuses exactly that run.
        assert own == stage1[:1]
        assert all(sources[s] == stage1[0] for s in stage1[1:])
        assert all(specs.index(sources[s]) < specs.index(s) for s in stage1[1:])
    assert all(sources[s] is None for s in specs if s.arm == "stage2")


def test_runs_without_a_start_take_their_seeds_whatever_the_order_they_were_run_or_named_in():
    # grpo-seed0 ran after rapo-seed0 in an earlier bench; this one names grpo first.
    grpo0, rapo0, grpo1 = expand_arms(["grpo", "rapo"], [0, 1])[:3]
    rapo_run = _run(0.4, 0.5, curve=[(0, 0.4), (64, 0.5)])
    results = {grpo0: _run(None, 0.6, curve=[(64, 0.6)]), rapo0: rapo_run}
    filled = fill_initial_evals(results, {0: rapo_run})
    assert filled[grpo0]["acc_initial"] == 0.4 and filled[grpo0]["curve"] == [(0, 0.4), (64, 0.6)]
    assert filled[rapo0] is rapo_run
    with pytest.raises(SystemExit, match="no run of seed 1 made one"):
        fill_initial_evals({grpo1: _run(None, 0.6)}, {0: rapo_run})


def test_finished_starts_are_stage_1_runs_that_evaluated_their_start(tmp_path):
    for name, acc0 in (("grpo-seed0", None), ("replay-seed0", 0.4), ("stage2-seed1", 0.5), ("rapo-seed2", 0.3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"accuracy_initial": acc0}))
    (tmp_path / "grpo-seed2").mkdir()  # an unfinished run: no summary
    # Seed 1's only start is stage 2's (its own labels and reward), so seed 1 has none.
    assert finished_starts(tmp_path, [0, 1, 2]) == {0: "replay-seed0", 2: "rapo-seed2"}


def test_a_run_without_its_step_0_eval_takes_the_sources_start_and_keeps_its_own_end():
    source = _run(0.4, 0.5, curve=[(0, 0.4), (64, 0.5)], REDUNDANTSEARCH_before=0.3)
    run = _run(None, 0.6, curve=[(64, 0.6)], REDUNDANTSEARCH_before=0.0, REDUNDANTSEARCH_after=0.2)
    merged = with_initial_eval(run, source)
    assert merged["acc_initial"] == 0.4 and merged["acc_final"] == 0.6
    assert merged["curve"] == [(0, 0.4), (64, 0.6)]
    assert merged["REDUNDANTSEARCH_before"] == 0.3 and merged["REDUNDANTSEARCH_after"] == 0.2
    # A run that evaluated its own start keeps it.
    assert with_initial_eval(source, run) is source


# ---- Ctrl-C while a run is going: the run tears down once, in full, and the bench stops --------------
# A stand-in for the CLI: records the signal that stops it, takes a while to tear down, then exits 130.
FAKE_RUN = """
import signal, sys, time, pathlib
d = pathlib.Path(sys.argv[1])
def tear_down(name):
    with open(d / "signals", "a") as f:
        f.write(name + "\\n")
    time.sleep(0.5)
    (d / "torn_down").write_text("yes")
    sys.exit(130)
# As the CLI: SIGTERM handled, SIGINT left to Python (KeyboardInterrupt, unless ignored at start-up).
signal.signal(signal.SIGTERM, lambda *a: tear_down("SIGTERM"))
(d / "ready").write_text("yes")
try:
    time.sleep(20)
except KeyboardInterrupt:
    tear_down("SIGINT")
"""
# The bench's side, as its own process (in the test's own session, as a terminal's foreground group is).
DRIVER = """
import sys
from bench.learning import run_to_the_end
print("rc", run_to_the_end([sys.executable, "-c", sys.argv[1], sys.argv[2]], sys.stdout, "grpo-seed0"), flush=True)
"""


def _sigint_default() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_ignored() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_driver(tmp_path, background: bool = False):
    """The bench as a terminal starts it (SIGINT at its default, whatever this test process inherited:
    a CI started in the background ignores it), or ``background``: as a script's `cmd &`, SIGINT ignored."""
    import subprocess
    import sys

    from bench.learning import REPO

    return subprocess.Popen([sys.executable, "-c", DRIVER, FAKE_RUN, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_sigint_ignored if background else _sigint_default)


def _wait_for(path, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_ctrl_c_lets_the_run_tear_down_once_then_stops_the_bench(tmp_path):
    import os
    import signal

    driver = _start_driver(tmp_path)
    try:
        _wait_for(tmp_path / "ready")
        os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        out, _ = driver.communicate(timeout=30)
    finally:
        driver.kill()
    # The run is in a session of its own, so it got one SIGINT (the bench's), and was not killed mid tear-down.
    assert (tmp_path / "signals").read_text().split() == ["SIGINT"]
    assert (tmp_path / "torn_down").exists()
    assert driver.returncode == 1 and "interrupted during grpo-seed0" in out and "Traceback" not in out, out


def test_a_run_outlives_no_killed_bench(tmp_path):
    import os
    import signal

    driver = _start_driver(tmp_path)
    try:
        _wait_for(tmp_path / "ready")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        _wait_for(tmp_path / "torn_down")  # the kernel's parent-death SIGTERM reached it
    finally:
        driver.kill()
    assert (tmp_path / "signals").read_text().split() == ["SIGTERM"]


def _step(scale, injections, staleness, is_weight, calls):
    return {"rapo/scale_factor": scale, "rapo/injections": injections, "rapo/replay_staleness": staleness,
            "learner/is_weight": is_weight, "train/tool_calls_per_episode": calls}


def test_parts_at_work_reads_what_each_part_did_from_the_steps():
    steps = [_step(4.0, 0, 0.0, 1.0, 2.1), _step(1.0, 2, 3.0, 0.998, 1.5), _step(2.0, 1, 6.0, 1.003, 0.75)]
    parts = parts_at_work(steps)
    assert parts["scale_mean"] == pytest.approx(7 / 3)
    # Staleness only over the steps that injected something: a step without replay reports 0, not "fresh".
    assert parts["replay_staleness"] == pytest.approx(4.5)
    assert (parts["is_weight_min"], parts["is_weight_max"]) == (0.998, 1.003)
    assert (parts["tool_calls_first"], parts["tool_calls_last"]) == (2.1, 0.75)
    # GRPO logs no RAPO metrics: nothing to report rather than zeros that look like a measurement.
    grpo = parts_at_work([{"learner/is_weight": 1.0, "train/tool_calls_per_episode": 2.0}])
    assert math.isnan(grpo["scale_mean"]) and math.isnan(grpo["replay_staleness"])


def test_parts_table_averages_over_the_seeds_where_a_part_acted():
    specs = expand_arms(["rapo", "grpo"], [0, 1])
    acted = {**_run(0.5, 0.6), **parts_at_work([_step(2.0, 1, 3.0, 1.0, 2.0)]), "episodes_saved": 8.0}
    idle = {**_run(0.5, 0.6), **parts_at_work([_step(1.0, 0, 0.0, 1.0, 1.0)]), "episodes_saved": 0.0}
    results = {s: (acted if s.seed == 0 else idle) if s.arm == "rapo" else _run(0.5, 0.6) for s in specs}
    rows = arm_rows(results)
    assert rows[0]["replay_staleness"] == 3.0 and rows[0]["scale_mean"] == 1.5 and rows[0]["episodes_saved"] == 4.0
    table = parts_table(rows)
    assert "| rapo | 1.50 | 3.0 | 3.0 | 1.000..1.000 | 1.0 | 4 | 1.50 -> 1.50 |" in table
    assert "| grpo | - | 3.0 | - | - | 1.0 | - | - -> - |" in table


def test_a_background_bench_stops_on_sigterm_and_its_run_still_tears_down(tmp_path):
    """Ignored signals are inherited: without resetting SIGINT for the run, the run of a bench started
    with SIGINT ignored would ignore the forwarded SIGINT and go on for its whole length."""
    import os
    import signal

    driver = _start_driver(tmp_path, background=True)
    try:
        _wait_for(tmp_path / "ready")
        os.kill(driver.pid, signal.SIGTERM)
        out, _ = driver.communicate(timeout=30)
    finally:
        driver.kill()
    assert (tmp_path / "signals").read_text().split() == ["SIGINT"]
    assert (tmp_path / "torn_down").exists()
    assert driver.returncode == 1 and "interrupted during grpo-seed0" in out, out


def test_paired_difference_counts_discordant_questions():
    a = {"q1": True, "q2": True, "q3": False, "q4": False, "extra": True}
    b = {"q1": True, "q2": False, "q3": True, "q4": False}
    diff, ci, a_only, b_only = paired_difference(a, b)
    assert (diff, a_only, b_only) == (0.0, 1, 1)  # "extra" is not shared: left out
    assert ci == pytest.approx(1.96 * math.sqrt(0.5 / 4))
    # Identical answers: no difference and no uncertainty about it, whatever the accuracy.
    assert paired_difference(b, b)[:2] == (0.0, 0.0)
    with pytest.raises(ValueError, match="no question in common"):
        paired_difference({"x": True}, {"y": True})


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_paired_difference_is_the_accuracy_gap_and_antisymmetric(pairs):
    a = {f"q{i}": x for i, (x, _) in enumerate(pairs)}
    b = {f"q{i}": y for i, (_, y) in enumerate(pairs)}
    diff, ci, _, _ = paired_difference(a, b)
    assert diff == pytest.approx(sum(a.values()) / len(a) - sum(b.values()) / len(b))
    back, ci_back, _, _ = paired_difference(b, a)
    assert back == pytest.approx(-diff) and ci_back == pytest.approx(ci) and ci >= 0


def test_paired_line_pairs_only_the_seeds_both_arms_ran():
    specs = expand_arms(["rapo", "grpo"], [0, 1]) + expand_arms(["rapo"], [2])
    correct = {0: ({"a": True, "b": True}, {"a": True, "b": False}),
               1: ({"a": False, "b": True}, {"a": True, "b": True}),
               2: ({"a": True, "b": True}, None)}
    results = {s: {"final_correct": correct[s.seed][0 if s.arm == "rapo" else 1]} for s in specs}
    line = paired_line(results)
    # Seed 2 has no GRPO run: 4 paired questions, one won by each arm.
    assert "over 2 seeds: +0.000" in line and "1 questions only rapo answered, 1 only grpo, of 4" in line
    assert paired_line({s: r for s, r in results.items() if s.arm == "rapo"}) is None


def test_dropping_a_finished_runs_weights_keeps_everything_the_tables_read(tmp_path):
    run_dir = tmp_path / "rapo-seed0"
    (run_dir / "eval").mkdir(parents=True)
    summary = {"accuracy_initial": 0.25, "accuracy_final": 0.5, "eval_questions": 4, "steps": 2,
               "replay_injections": 1, "pruned_questions": 1, "episodes_saved_by_pruning": 4}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    steps = [_step(2.0, 1, 3.0, 1.0, 2.0), _step(1.0, 0, 0.0, 1.0, 1.5)]
    evals = [{"step": 0, "eval/accuracy": 0.25}, {"step": 2, "eval/accuracy": 0.5}]
    (run_dir / "history.json").write_text(json.dumps({"steps": steps, "evals": evals}))
    for step, right in ((0, {"a"}), (2, {"a", "b"})):
        rows = [{"id": q, "correct": q in right, "labels": []} for q in "abcd"]
        (run_dir / "eval" / f"step-{step:04d}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in WEIGHT_DIRS:
        (run_dir / name / "rapo_step_2").mkdir(parents=True)
        (run_dir / name / "rapo_step_2" / "model.bin").write_bytes(b"\0" * 1024)
    before = read_run(run_dir, batch=8)

    drop_weights(run_dir)

    assert not any((run_dir / name).exists() for name in WEIGHT_DIRS)
    assert read_run(run_dir, batch=8) == before
    assert before["final_correct"] == {"a": True, "b": True, "c": False, "d": False}
