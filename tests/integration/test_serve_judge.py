"""`rapo serve-judge`: vLLM's OpenAI server on a model folder, reachable by the judge client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rewards.judge_client import JudgeClient, JudgeSettings
from rollout.engine_factory import vllm_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]
REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_serve_judge_answers_the_judge_client(tiny_model_dir):
    port, key = _port(), "sk-serve-judge-test"
    env = {**os.environ, "RAPO_JUDGE_API_KEY": key}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve-judge",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--",
            "--dtype",
            "float32",
            "--enforce-eager",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while _status(f"{base}/models", key) != 200:
            assert proc.poll() is None, f"serve-judge exited: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "vLLM server not ready in 180 s"
            time.sleep(1)
        assert _status(f"{base}/models") == 401  # the key is required
        assert key not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))

        async def judge():
            os.environ["RAPO_JUDGE_API_KEY"] = key
            client = JudgeClient(
                JudgeSettings(base_url=base, model="judge", max_retries=0, max_tokens=16, timeout_s=60)
            )
            try:
                outcome = await client.judge_answer("Who founded Velmora?", ["Osric Talm"], "Osric Talm")
                return outcome, client.stats
            finally:
                await client.close()

        outcome, stats = asyncio.run(judge())
        # A random tiny model does not write valid JSON: the real HTTP round trip happened, the
        # reply failed validation, and the rule judge answered instead (counted, not a silent 0).
        assert stats.requests >= 1
        assert outcome.correct is True and (outcome.source == "llm" or outcome.fallback)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.environ.pop("RAPO_JUDGE_API_KEY", None)
