"""start_local_ray: a node that misses Ray's start-up limit is tried again, and what it left is stopped.

The `init` stand-in starts a real child process, as a failed ray.init leaves its GCS and raylet,
then fails the way Ray does.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from cluster.bootstrap import NODE_START_TIMEOUT, start_local_ray


class FlakyInit:
    def __init__(self, failures: int, error: str = f"The current node {NODE_START_TIMEOUT}. This could happen"):
        self.failures, self.error = failures, error
        self.calls: list[dict] = []
        self.children: list[subprocess.Popen] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        # A process that outlives the failed call, like the raylet of a failed ray.init.
        self.children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        if len(self.calls) <= self.failures:
            raise Exception(self.error)
        return "ray-info"


@pytest.fixture
def reap():
    made: list[FlakyInit] = []
    yield made.append
    for init in made:
        for child in init.children:
            child.kill()
            child.wait()


def test_a_missed_start_up_limit_is_tried_again_after_stopping_what_it_left(reap):
    init = FlakyInit(failures=2)
    reap(init)
    # Another child of this process, started before: not the failed start's, so it must survive.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    logged: list[str] = []
    try:
        assert start_local_ray(attempts=3, log=logged.append, init=init, num_cpus=4) == "ray-info"
        assert [c["address"] for c in init.calls] == ["local"] * 3
        assert all(c["num_cpus"] == 4 for c in init.calls)
        # Each failed try's process was stopped before the next try; the successful one's is kept.
        assert [c.poll() is not None for c in init.children] == [True, True, False]
        assert bystander.poll() is None
        assert len(logged) == 2 and "trying again (2 of 3)" in logged[0] and "(3 of 3)" in logged[1]
    finally:
        bystander.kill()
        bystander.wait()


def test_the_last_failure_is_raised_and_other_errors_are_not_retried(reap):
    init = FlakyInit(failures=5)
    reap(init)
    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        start_local_ray(attempts=2, log=lambda _: None, init=init)
    assert len(init.calls) == 2

    other = FlakyInit(failures=1, error="Address already in use")
    reap(other)
    with pytest.raises(Exception, match="already in use"):
        start_local_ray(attempts=3, log=lambda _: None, init=other)
    assert len(other.calls) == 1
    # A failure that is not retried leaves the processes to the caller's clean-up (ray.shutdown, exit).
    assert psutil.pid_exists(other.children[0].pid)
