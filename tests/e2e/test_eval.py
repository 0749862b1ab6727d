"""`rapo eval` on a run's exported policy reports the held-out accuracy of the run's summary.

A short SmolLM2 run (real vLLM, DeepSpeed, Ray, Redis; the stage-2 run of test_llm_judge_run,
shared through the session fixture `judged_run`), then `rapo eval RUN/policy` as a user runs it:
its own process, a fresh vLLM engine in that process, no Ray, judged through the run's LLM judge
(the test server is still serving; its API key in the environment, as for the run).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

COMPARED = ("answer", "correct", "tool_calls", "response_tokens", "finish_reason")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_of_a_runs_policy_matches_the_runs_final_eval(rapo, judged_run, tmp_path):
    def cli(*args: str, timeout: float):
        p = rapo(*args, env={judged_run.key_env: judged_run.key})
        assert p.wait(timeout=timeout) == 0, p.output[-4000:]
        # Everything it started (Ray, Redis, learners, vLLM's engine core) went with it.
        assert p.group_gone(timeout=30), f"rapo {args[0]} left processes behind"
        return p

    run = judged_run.out
    assert judged_run.code == 0 and judged_run.gone, judged_run.output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"

    # No --config, no --data: RUN/policy takes RUN/config.yaml and its held-out set.
    results = tmp_path / "heldout.jsonl"
    p = cli("eval", str(run / "policy"), "--output", str(results), timeout=600)
    assert "Traceback" not in p.output and "Exception ignored" not in p.output, p.output[-4000:]
    assert "".join(f"config: {run / 'config.yaml'}".split()) in "".join(p.output.split())  # the console wraps lines
    rows = read_jsonl(results)
    ev = json.loads((tmp_path / "heldout.summary.json").read_text())
    assert ev["questions"] == summary["eval_questions"] == len(rows) == 8
    assert ev["accuracy"] == summary["accuracy_final"]
    assert ev["tool_calls_per_question"] == pytest.approx(sum(r["tool_calls"] for r in rows) / 8)
    assert ev["response_tokens_per_question"] == pytest.approx(sum(r["response_tokens"] for r in rows) / 8)
    assert {"id", "question", "gold", "aliases", *COMPARED} <= set(rows[0])

    # Episode by episode against the run's final eval, whose worker ran the weights the policy
    # folder holds: same prompts, same float32 weights, same per-request seeds, same engine settings.
    final = {r["id"]: r for r in read_jsonl(run / "eval" / f"step-{summary['steps']:04d}.jsonl")}
    assert set(final) == {r["id"] for r in rows}
    same = [r["id"] for r in rows if all(r[k] == final[r["id"]][k] for k in COMPARED)]
    # Measured: every episode replays exactly (8 of 8 here; 32 of 32 on the demo's SmolLM2 policy
    # after 8 RAPO steps, accuracy 0.469 in both). Another batch mix may still change a float32
    # sum in its last bit and flip a near-tied token, so one episode in 8 is allowed to differ.
    assert len(same) >= 7, [(r, final[r["id"]]) for r in rows if r["id"] not in same]

    # --data: three held-out questions written as a user would (ids kept: they seed the
    # episodes), and one of our own with a number answer, an alias and no id.
    lines = [json.dumps({"id": r["id"], "question": r["question"], "answer": r["gold"], "aliases": r["aliases"]})
             for r in rows[:3]]
    lines.append(json.dumps({"question": "In which year was Nobody Atall born?", "answer": 1901, "aliases": ["MCMI"]}))
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(lines) + "\n")
    mine = tmp_path / "mine-results.jsonl"
    cli("eval", str(run / "policy"), "--data", str(data), "--output", str(mine), timeout=600)
    out = read_jsonl(mine)
    assert [(r["id"], r["gold"]) for r in out] == [*((r["id"], r["gold"]) for r in rows[:3]), ("line-4", "1901")]
    assert out[3]["aliases"] == ["MCMI"] and out[3]["question"] == "In which year was Nobody Atall born?"
    ev = json.loads((tmp_path / "mine-results.summary.json").read_text())
    assert ev["questions"] == 4 and ev["data"] == str(data)
    assert ev["accuracy"] == sum(bool(r["correct"]) for r in out) / 4
    # The held-out questions replay their held-out episodes in a smaller batch (3 of 3 measured;
    # the same caveat as above).
    replayed = [r["id"] for r, h in zip(out[:3], rows[:3]) if all(r[k] == h[k] for k in COMPARED)]
    assert len(replayed) >= 2, (out[:3], rows[:3])
