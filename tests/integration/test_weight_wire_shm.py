"""The gloo weight wire with real gloo groups: receivers that map buckets from shared memory beside
receivers that take the broadcast, in one group, push after push (rollout/weight_wire.py).

Every rank is a thread of this process (gloo groups do not care), talking over 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from rollout.weight_wire import (
    SHM_PREFIX,
    GroupAddress,
    join_group,
    offer_shared_memory,
    open_store,
    plan_buckets,
    probe_path,
    receive,
    remove_stale_segments,
    send_bucket,
)

HOST = "127.0.0.1"


def _model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"embed": [50, 16], "l0.qkv": [48, 16], "l0.norm": [16], "l1.mlp": [32, 16], "head.bias": [7]}
    return {n: torch.randn(s, generator=gen, dtype=torch.float32) for n, s in shapes.items()}


def _run(fn, *args):
    """fn(*args) in a thread; returns a getter that re-raises the thread's exception."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def get(timeout: float = 60):
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return get


def _form(offer: str, shm_dir: Path, tags: list[str], shm_dirs: list[Path], timeout_s: float = 30.0):
    """Rank 0's group (offering `offer` in shm_dir) and the receivers' groups; receiver r is given
    tags[r-1] and looks in shm_dirs[r-1]."""
    world = 1 + len(tags)
    store = open_store(HOST, timeout_s)
    address = GroupAddress(HOST, store.port, 0, world, timeout_s, offer)
    sender = _run(join_group, address, store, shm_dir)
    receivers = [
        _run(join_group, GroupAddress(HOST, store.port, r, world, timeout_s, tags[r - 1]), None, shm_dirs[r - 1])
        for r in range(1, world)
    ]
    return sender(), [get() for get in receivers]


def _push(sender, receivers, model: dict[str, torch.Tensor], plan) -> list[dict[str, torch.Tensor]]:
    def take(group):
        # Clones: what a loader copies into its parameters before the push ends (the next rewrites the files).
        return {name: t.clone() for bucket in receive(group, plan) for name, t in bucket}

    got = [_run(take, g) for g in receivers]
    for bucket in plan.buckets():
        send_bucket(sender, bucket, [model[name].to(dtype) for name, dtype, _ in bucket])
    sender.finish_push()
    return [get() for get in got]


@pytest.fixture
def shm_dir(tmp_path):
    # Any directory stands in for /dev/shm: the files are mapped the same way (tmpfs only keeps them in memory).
    d = tmp_path / "shm"
    d.mkdir()
    return d


def test_mapping_and_broadcast_receivers_get_every_version_exactly(shm_dir, tmp_path):
    tag = offer_shared_memory(1 << 20, shm_dir)
    assert tag and probe_path(tag, shm_dir).exists()
    elsewhere = tmp_path / "other-node"  # a receiver whose /dev/shm is not the sender's
    elsewhere.mkdir()
    # Ranks 1 and 2 map; rank 3 was not offered shared memory; rank 4 was, but cannot see the probe.
    sender, receivers = _form(tag, shm_dir, [tag, tag, "", tag], [shm_dir, shm_dir, shm_dir, elsewhere])
    try:
        assert sender.local_receivers == 2 and [g.maps for g in receivers] == [True, True, False, False]
        assert receivers[0].remote is None and receivers[2].remote is not None and receivers[3].remote is not None
        for version in range(3):
            model = _model(version)
            plan = plan_buckets([(n, "bfloat16", list(t.shape)) for n, t in model.items()], 2048)
            assert len(plan.bucket_sizes) > 1
            for got in _push(sender, receivers, model, plan):
                assert set(got) == set(model)
                for name, t in got.items():
                    assert torch.equal(t, model[name].to(torch.bfloat16)), (version, name)
            # One file per bucket, kept for the group's life and rewritten push after push.
            assert len(list(shm_dir.iterdir())) == 1 + len(plan.bucket_sizes)
    finally:
        for g in (sender, *receivers):
            g.shutdown()
    assert list(shm_dir.iterdir()) == []


def test_without_an_offer_every_receiver_takes_the_broadcast(shm_dir):
    sender, receivers = _form("", shm_dir, ["", ""], [shm_dir, shm_dir])
    try:
        assert sender.local_receivers == 0 and sender.remote is sender.pg
        model = _model(7)
        plan = plan_buckets([(n, "float32", list(t.shape)) for n, t in model.items()], 4096)
        for got in _push(sender, receivers, model, plan):
            assert all(torch.equal(t, model[name]) for name, t in got.items())
        assert list(shm_dir.iterdir()) == []
    finally:
        for g in (sender, *receivers):
            g.shutdown()


def test_a_receiver_that_never_maps_fails_the_push_named_and_in_time(shm_dir):
    tag = offer_shared_memory(1 << 20, shm_dir)
    sender, receivers = _form(tag, shm_dir, [tag], [shm_dir], timeout_s=2.0)
    try:
        model = _model(1)
        plan = plan_buckets([(n, "float32", list(t.shape)) for n, t in model.items()], 1 << 20)
        (bucket,) = list(plan.buckets())
        send_bucket(sender, bucket, [model[name] for name, _, _ in bucket])
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="1 of 1 receivers on the learner's node did not take push 0"):
            sender.finish_push()
        assert time.monotonic() - t0 < 10
    finally:
        for g in (sender, *receivers):
            g.shutdown()
    assert list(shm_dir.iterdir()) == []  # the sender's shutdown removes its files


def test_no_offer_where_there_is_no_room_or_no_directory(shm_dir, tmp_path):
    assert offer_shared_memory(1 << 60, shm_dir) == ""
    assert offer_shared_memory(1, tmp_path / "missing") == ""
    assert list(shm_dir.iterdir()) == []


def test_only_dead_senders_files_of_this_run_or_old_ones_are_removed(shm_dir):
    dead = _dead_pid()
    old, recent = time.time() - 3600, time.time()
    files = {
        f"{SHM_PREFIX}{dead}-runA-aa-0": (recent, True),  # this run's, its sender gone
        f"{SHM_PREFIX}{dead}-runB-bb-0": (old, True),  # another run's, sender gone, old
        f"{SHM_PREFIX}{dead}-runB-cc.probe": (recent, False),  # another run's, recent: maybe another pid namespace
        f"{SHM_PREFIX}{os.getpid()}-runA-dd-0": (old, False),  # its sender is alive
        "someone-else": (old, False),  # not ours
    }
    for name, (mtime, _) in files.items():
        (shm_dir / name).write_bytes(b"x")
        os.utime(shm_dir / name, (mtime, mtime))
    assert remove_stale_segments(shm_dir, "runA") == 2
    assert sorted(p.name for p in shm_dir.iterdir()) == sorted(n for n, (_, gone) in files.items() if not gone)
    # A new offer clears the same way, and names its files by run.
    tag = offer_shared_memory(1 << 20, shm_dir, run="run/A!")
    assert tag.split("-")[:2] == [str(os.getpid()), "runA"]


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
