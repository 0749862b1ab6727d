"""`rapo run deploy/configs/smoke.yaml rewards.stage=2` with an LLM judge behind a real HTTP server.

One run (the session fixture `judged_run` of tests/e2e/conftest.py, which test_eval shares)
covers two things:
- the LLM judge path end to end: the judge is tests/servers/openai_server.py (it judges by the
  rules, with injected HTTP errors and malformed replies), reached by the Ray reward actors
  over 127.0.0.1; the run completes, and summary.json and MLflow show what the judge did:
  per-label counts, latency, retries, fallbacks;
- secrets: the judge's API key comes from the environment only, the server checks that it
  was sent, and neither the key nor the run's Redis password appears in any file the run
  wrote, in its output, in the Ray session logs or in the MLflow params and tags.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from rewards.judge_prompts import LABELS_TASK
from tests.e2e.conftest import mlflow_run
from tests.servers.openai_server import MALFORMED

pytestmark = pytest.mark.slow

# One RL step of 2 questions x 2 samples (SmolLM2 trains about 100 tokens/s on 2 cores), no held-out
# eval before it (pipeline.eval_at_start=false): the judge's first requests are the step's own.
STEPS, SAMPLES = 1, 2
LATENCY_S = 0.05
KEY_ENV = "RAPO_E2E_JUDGE_KEY"
# Reward actors x trajectories each scores at once: the most judgements that can be in flight.
ACTORS, PER_ACTOR = 2, 4
# With one retry per judgement, a judgement falls back when both its attempts fail. The server fails
# the first request and its retry (it knows a retry by its body), whatever arrives in between: step 1
# has at least one retry and one fallback, and its other judgements meet only the random faults.
# (Failing the first ACTORS*PER_ACTOR + 1 requests, whatever they were, also forces a fallback, but
# took every answer judgement of a 4-episode step: no verdict from the LLM.)
MAX_RETRIES = 1
PLANNED_FAILURES = MAX_RETRIES + 1


def _files(root: Path):
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _holding(secrets_: dict[str, str], paths) -> dict[str, list[str]]:
    """{name: [files holding that secret]}, reading each file once in chunks (checkpoints are GBs)."""
    needles = {name: s.encode() for name, s in secrets_.items()}
    keep = max(map(len, needles.values())) - 1
    found: dict[str, list[str]] = {name: [] for name in needles}
    for path in paths:
        seen: set[str] = set()
        try:
            with open(path, "rb") as fh:
                tail = b""
                while chunk := fh.read(8 << 20):
                    window = tail + chunk
                    seen.update(name for name, n in needles.items() if n in window)
                    tail = window[-keep:]
        except OSError:  # a file removed while we walk
            continue
        for name in seen:
            found[name].append(str(path))
    return found


def test_stage2_run_through_the_llm_judge_keeps_its_secrets(judged_run):
    # The run itself is the session fixture tests/e2e/conftest.py judged_run (test_eval reads it too).
    out, key, ray_tmp, srv = judged_run.out, judged_run.key, judged_run.ray_tmp, judged_run.server
    output, chat, faults = judged_run.output, judged_run.chat, Counter(judged_run.faults)
    assert judged_run.code == 0, output[-4000:]
    assert judged_run.gone
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"judge: {len(chat)} chat requests, tasks {Counter(r.task for r in chat)}, faults {dict(faults)}; "
        f"summary {summary['judge_requests']} requests, "
        f"{summary['judge_fallbacks']} fallbacks, {summary['tool_calls_per_episode']} tool calls/episode"
    )

    # ---- the LLM path was taken, with the key from the environment ------------------------
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["reward_stage"] == 2 and summary["judge"] == "llm"
    assert chat, "the run never called the judge"
    assert all(r.authorization and r.authorized for r in chat), "a judge request came without the right API key"
    # Every request the reward actors counted reached the server, and nothing else did.
    assert summary["judge_requests"] == len(chat)
    # Stage 2: the step labeller is asked about every episode that called a tool.
    assert any(r.task == LABELS_TASK for r in chat)
    assert faults[MALFORMED] >= PLANNED_FAILURES and faults["ok"] > 0
    assert summary["judge_fallbacks"] >= 1
    assert not summary["errors"], summary["errors"]

    # ---- no secret anywhere it could be read -----------------------------------------------
    redis_dir = out / "redis"
    password = (redis_dir / "password").read_text().strip()
    assert len(password) >= 16
    # By design the Redis password lives in these two files of the run's Redis data folder:
    # the password file (kept so that a resumed run can restart Redis on the same AOF) and
    # the redis.conf it is handed to redis-server in (not the command line, which `ps`
    # shows). Both are 0600; the AOF itself must not hold it (AUTH is never written there).
    by_design = {redis_dir / "password", redis_dir / "redis.conf"}
    for path in by_design:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    run_files = [f for f in _files(out) if f not in by_design]
    assert {"summary.json", "status.json", "config.yaml", "history.json", "mlflow.db"} <= {
        f.name for f in run_files
    }
    assert any("mlartifacts" in f.parts for f in run_files)
    assert any("appendonlydir" in f.parts for f in run_files), "no AOF to search"
    ray_files = list(_files(ray_tmp))
    assert any(f.suffix in (".out", ".err", ".log") for f in ray_files), "no Ray session logs to search"
    # (A leak is reported by where it is: an assertion on `secret in text` would print the secret.)
    hidden = {"judge API key": key, "Redis password": password}
    in_output = [name for name, secret in hidden.items() if secret in output]
    assert not in_output, f"the run's output holds the {in_output}"
    leaks = {name: where for name, where in _holding(hidden, run_files + ray_files).items() if where}
    assert not leaks, f"secrets in files: {leaks}"
    # The search itself finds what is there.
    assert _holding(hidden, sorted(by_design))["Redis password"] == [str(f) for f in sorted(by_design)]

    client, run = mlflow_run(out, summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["rewards.stage"] == "2"
    assert run.data.params["rewards.judge.base_url"] == srv.base_url
    # The secret filter drops values, not the names of where secrets come from, nor token counts.
    assert run.data.params["rewards.judge.api_key_env"] == KEY_ENV
    assert run.data.params["rollout.max_tokens_per_turn"] == "96"
    leaked = [
        name
        for name, value in [*run.data.params.items(), *run.data.tags.items()]
        if key in value or password in value
    ]
    assert not leaked, f"a secret is in the MLflow params or tags {leaked}"

    # ---- MLflow shows what the judge did ---------------------------------------------------
    run_id = run.info.run_id
    last = run.data.metrics  # the latest value of each metric
    labels = {k: v for k, v in last.items() if k.startswith("labels/")}
    assert labels and sum(labels.values()) > 0, sorted(last)
    assert set(labels) <= {
        f"labels/{x}" for x in ("UNIQUESEARCH", "REDUNDANTSEARCH", "EXPLORATION", "VERIFICATION", "REDUNDANTQUERY")
    }
    assert last["judge/source_llm"] > 0  # trajectories whose verdict (and labels) came from the LLM
    for metric in (
        "judge/latency_s",
        "judge/request_latency_s",
        "judge/requests",
        "judge/retries",
        "judge/fallbacks",
    ):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == list(range(1, STEPS + 1)), metric
    # Time to judge one trajectory, and one HTTP call, which the server delays by LATENCY_S.
    assert last["judge/latency_s"] > 0
    assert LATENCY_S <= last["judge/request_latency_s"] < LATENCY_S + 5
    # Counted up to the last step; the final evaluation's requests come after it.
    assert 0 < last["judge/requests"] <= summary["judge_requests"]
    assert last["judge/retries"] >= 1 and last["judge/fallbacks"] >= 1
