"""Shared fixtures: the model cache, tokenizer and tiny model folders, a real Redis server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cluster.bootstrap import ACTOR_ENV

# What the CLI sets for itself and its actors, for the tests that run the pieces in-process too. Before
# any torch import: libgomp reads GOMP_SPINCOUNT as it loads.
for _key, _value in ACTOR_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    from cluster.config import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir) -> Path:
    from cluster.model_prep import smollm2_base

    return smollm2_base(cache_dir, log=lambda m: None)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    from learner.policy_init import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", smollm2_dir, hidden=64, layers=2, seed=0)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from cluster.redis_server import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


# How the suite spreads over pytest-xdist workers (`make test` runs `-n 2 --dist loadfile`):
# each file is one unit of work (its module fixtures run once), files that share a session
# fixture are one unit (each worker would otherwise start that run itself), and units go out in
# the order below.
SHARED_RUNS = {
    "test_llm_judge_run.py": "judged-run", "test_eval.py": "judged-run",
    "test_smoke_run.py": "smoke-run", "test_dashboard_metrics.py": "smoke-run", "test_resume.py": "smoke-run",
}
# The longest unit first (the SmolLM2 run, its policy built first); while it trains, the other worker
# takes the unit and integration tests, which mostly use one thread, then both take the other runs,
# longest first.
ORDER = ["judged-run", "unit", "integration", "smoke-run", "e2e/test_two_nodes.py",
         "e2e/test_fault_tolerance.py", "e2e/test_submit.py", "e2e/test_hostile_run.py"]


def work_unit(path: str | Path) -> str:
    path = Path(path)
    return SHARED_RUNS.get(path.name) or f"{path.parent.name}/{path.name}"


def _rank(path: Path) -> int:
    for unit in (work_unit(path), path.parent.name):
        if unit in ORDER:
            return ORDER.index(unit)
    return len(ORDER)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _rank(item.path))  # stable: collection order kept within a rank


_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(trylast=True)  # below the durations
def pytest_terminal_summary(terminalreporter, config):
    """The whole suite's wall time: pytest's own figure leaves out the SmolLM2 preparation above."""
    if hasattr(config, "workerinput") or _STARTED not in config.stash:
        return
    terminalreporter.write_line(f"suite wall time, SmolLM2 preparation included: "
                                f"{time.monotonic() - config.stash[_STARTED]:.0f} s")


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: `-p no:xdist` must still run
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` by work unit, in the order above (xdist's own loadgroup marks do not reach
    the scheduler under pytest 9.2: it renames node ids through an attribute pytest no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class WorkUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep the order above, not most tests first
    return WorkUnits(config, log)


def pytest_configure(config):
    """The suite's clock starts here. The judged run builds its SmolLM2 policy itself (convert and
    warm start, cached per machine), while the other worker runs the unit and integration tests: with
    GOMP_SPINCOUNT set above, the two share the cores instead of spinning against each other (the
    warm start once took 6x as long beside other tests, so it used to be built before the workers)."""
    config.stash[_STARTED] = time.monotonic()
