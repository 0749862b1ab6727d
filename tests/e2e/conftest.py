"""Run the real `rapo` CLI as a subprocess in its own process group, and clean up after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies (exited, not yet reaped; PID 1 here does not reap) count as gone.
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class RapoProcess:
    def __init__(self, args: list[str], env: dict | None = None):
        self.log_path = None
        full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.output = ""

    def wait(self, timeout: float) -> int:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            self.output += out or ""
            raise AssertionError(f"rapo did not finish within {timeout} s:\n{self.output[-4000:]}")
        self.output += out or ""
        return self.proc.returncode

    def wait_for_line(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output += line
            if needle in line:
                return
        raise AssertionError(f"{needle!r} not printed within {timeout} s:\n{self.output[-4000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def group_gone(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not group_alive(self.pgid):
                return True
            time.sleep(0.5)
        return False


@pytest.fixture
def rapo():
    started: list[RapoProcess] = []

    def start(*args: str, env: dict | None = None) -> RapoProcess:
        p = RapoProcess(list(args), env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
