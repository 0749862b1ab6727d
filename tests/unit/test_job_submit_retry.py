"""submit_when_ready: a head without a job agent yet is asked again; anything else fails at once.

The stand-in client answers as Ray's JobSubmissionClient does (it raises RuntimeError with the
dashboard's HTTP error text); the real head's case is in tests/e2e/test_submit.py.
"""

from __future__ import annotations

import pytest

from cluster.jobs import NO_AGENT_YET, submit_when_ready

REFUSED = f"Request failed with status code 500: {NO_AGENT_YET}, please try again later.."


class Head:
    def __init__(self, refusals: int, error: str = REFUSED):
        self.refusals, self.error, self.calls = refusals, error, []

    def submit_job(self, **job):
        self.calls.append(job)
        if len(self.calls) <= self.refusals:
            raise RuntimeError(self.error)
        return "raysubmit_1"


def test_refused_while_the_agent_starts_then_submitted_once_with_the_same_job():
    head, logged = Head(refusals=3), []
    job = {"entrypoint": "python -m cluster.cli run x.yaml", "runtime_env": {"working_dir": "."}}
    assert submit_when_ready(head, wait_s=10, poll_s=0.01, log=logged.append, **job) == "raysubmit_1"
    assert head.calls == [job] * 4
    assert len(logged) == 1 and "job agent" in logged[0]  # said once, not per try


def test_gives_up_after_the_wait_and_never_retries_other_errors():
    head = Head(refusals=10**6)
    with pytest.raises(RuntimeError, match=NO_AGENT_YET):
        submit_when_ready(head, wait_s=0.05, poll_s=0.01, entrypoint="x")
    assert 1 < len(head.calls) < 100

    bad = Head(refusals=1, error="Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit_when_ready(bad, wait_s=10, poll_s=0.01, entrypoint="x")
    assert len(bad.calls) == 1
