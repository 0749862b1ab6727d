"""The weight transports' payloads, checked against vLLM's own NCCL engine code (CPU only).

No NCCL runs here: the communicator is a fake that hands each broadcast buffer from the learner's
side to the receivers' side, and CUDA streams are stubbed. What is real is vLLM's code on both
ends: its dataclasses parse what the transport builds, its packed producer sends what the
learner's sender gives it, and its NCCLWeightTransferEngine receives and loads it.
"""

import contextlib
from collections import deque
from pathlib import Path

import pytest
import torch

from cluster.config import RunConfig, load_config
from cluster.engines import engine_spec
from rollout.vllm_weight_transfer import GlooInitInfo
from rollout.weight_transport import GlooTransport, NCCLTransport, rank_offsets, weight_transport
from rollout.weight_wire import plan_buckets

nccl_engine = pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
packed_tensor = pytest.importorskip("vllm.distributed.weight_transfer.packed_tensor")

GPU_NCCL = ["weights.transport=nccl", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_worker=1"]


def _vllm_engine():
    """vLLM's receiving engine without its model or communicator (parse_* use only the class's dataclasses)."""
    return nccl_engine.NCCLWeightTransferEngine.__new__(nccl_engine.NCCLWeightTransferEngine)


def _params():
    shapes = [[64, 32], [32], [100, 7], [3, 5, 2], [512, 64], [1], [64, 32]]
    return [(f"model.layers.{i}.w", "bfloat16", s) for i, s in enumerate(shapes)]


def test_the_nccl_engine_spec_carries_vllms_nccl_backend():
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    cfg = load_config(None, GPU_NCCL)
    spec = engine_spec(cfg, Path("/m"), "vllm", cfg.weights.resolve("vllm", "deepspeed", 1, 1))
    assert spec.extra["weight_transfer_config"] == {"backend": "nccl"}
    backend = WeightTransferConfig(**spec.extra["weight_transfer_config"]).backend
    assert WeightTransferEngineFactory._registry[backend]() is nccl_engine.NCCLWeightTransferEngine
    # gloo keeps the project's engine; file and the transformers engine get none.
    assert engine_spec(RunConfig(), Path("/m"), "vllm", "gloo").extra["weight_transfer_config"] == {
        "backend": "rapo_gloo"}
    assert "weight_transfer_config" not in engine_spec(RunConfig(), Path("/m"), "vllm", "file").extra
    assert "weight_transfer_config" not in engine_spec(RunConfig(), Path("/m"), "transformers", "gloo").extra


def test_rank_offsets_put_each_engines_ranks_after_learner_rank_0():
    assert rank_offsets([1, 1, 1]) == ([1, 2, 3], 4)
    assert rank_offsets([1, 2, 1]) == ([1, 2, 4], 5)
    with pytest.raises(ValueError):
        rank_offsets([1, 0])


def test_nccl_init_infos_parse_as_vllms_and_give_every_worker_its_own_rank():
    transport = NCCLTransport(bucket_bytes=8 << 20)
    address = {"master_address": "10.0.0.5", "master_port": 41234}
    member_ranks = [1, 2, 1]  # the second engine is split over two GPUs
    parsed = [_vllm_engine().parse_init_info(info) for info in transport.init_infos(address, member_ranks)]
    assert all(isinstance(p, nccl_engine.NCCLWeightTransferInitInfo) for p in parsed)
    assert [p.rank_offset for p in parsed] == [1, 2, 4]
    assert {p.world_size for p in parsed} == {5}
    assert {(p.master_address, p.master_port) for p in parsed} == {("10.0.0.5", 41234)}
    assert all(p.packed and p.packed_buffer_size_bytes == 8 << 20 and p.nccl_unique_id_b64 is None for p in parsed)
    # The rank vLLM's worker computes (nccl_common.worker_init_process_group): its rank inside the
    # engine plus rank_offset. Together with the learner's 0 they must be 0..world_size-1, once each.
    ranks = [0] + [p.rank_offset + r for p, n in zip(parsed, member_ranks) for r in range(n)]
    assert sorted(ranks) == list(range(5))


def test_nccl_update_infos_parse_as_vllms_one_per_bucket_with_the_plans_names_dtypes_shapes():
    plan = plan_buckets(_params(), bucket_bytes=8 << 10)
    assert len(plan.bucket_sizes) > 2
    updates = NCCLTransport(bucket_bytes=8 << 10).update_infos(plan)
    parsed = [_vllm_engine().parse_update_info(u) for u in updates]
    assert [len(p.names) for p in parsed] == plan.bucket_sizes
    assert [n for p in parsed for n in p.names] == plan.names
    assert [getattr(torch, d) for p in parsed for d in p.dtype_names] == [torch.bfloat16] * len(plan.names)
    assert [s for p in parsed for s in p.shapes] == plan.shapes
    # gloo sends the whole plan in one update, parsed by the project's engine.
    (gloo,) = GlooTransport(8 << 10).update_infos(plan)
    assert gloo["names"] == plan.names and gloo["bucket_sizes"] == plan.bucket_sizes


def test_gloo_init_infos_keep_one_rank_per_engine():
    infos = GlooTransport(1 << 20).init_infos({"master_address": "h", "master_port": 1, "rank": 0, "world_size": 9,
                                               "timeout_s": 5.0}, [1, 1])
    assert [(i["rank"], i["world_size"]) for i in infos] == [(1, 3), (2, 3)]
    with pytest.raises(ValueError):
        GlooTransport(1 << 20).init_infos({}, [2])


def test_gloo_offers_shared_memory_only_to_engines_on_the_learners_node():
    address = {"master_address": "h", "master_port": 1, "rank": 0, "world_size": 4, "timeout_s": 5.0,
               "shm_tag": "123-ab", "node_id": "node-A"}
    infos = GlooTransport(1 << 20).init_infos(address, [1, 1, 1], ["node-A", "node-B", "node-A"])
    assert [i["shm_tag"] for i in infos] == ["123-ab", "", "123-ab"]
    assert all("node_id" not in i for i in infos)  # not a field of the engines' init info
    (init,) = [GlooInitInfo(**i) for i in infos[:1]]
    assert init.shm_tag == "123-ab" and init.rank == 1 and init.world_size == 4
    # Without the members' nodes (the benchmark, a test), every member is offered it; its probe decides.
    assert [i["shm_tag"] for i in GlooTransport(1 << 20).init_infos(address, [1, 1])] == ["123-ab"] * 2


class _FakeCommunicator:
    """Stands in for vLLM's PyNcclCommunicator: the sender's buffers reach the receiver in order,
    and a receiver posting a buffer of another size than the one sent fails (NCCL would hang)."""

    def __init__(self):
        self.wire = deque()
        self.sent_sizes = []

    def broadcast(self, tensor, src, stream=None):
        assert src == 0
        if tensor.dtype == torch.uint8 and self._sending:
            self.wire.append(tensor.clone())
            self.sent_sizes.append(tensor.numel())
        else:
            sent = self.wire.popleft()
            assert sent.numel() == tensor.numel(), "receiver cut the stream elsewhere than the sender"
            tensor.copy_(sent)


class _Stream:
    def synchronize(self):
        pass


@pytest.fixture
def no_cuda_streams(monkeypatch):
    monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, n: tuple(_Stream() for _ in range(n)))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: None)


@pytest.mark.parametrize("bucket_bytes", [8 << 10, 40 << 10, 1 << 10])
def test_learner_buckets_arrive_whole_through_vllms_packed_producer_and_nccl_engine(no_cuda_streams, bucket_bytes):
    """The learner's sender (one packed producer call per bucket, cast to bf16) and vLLM's receiving
    engine (one update_weights per bucket) cut the stream at the same places; every tensor arrives."""
    torch.manual_seed(0)
    master = {name: torch.randn(shape, dtype=torch.float32) for name, _, shape in _params()}
    plan = plan_buckets(_params(), bucket_bytes)
    transport = NCCLTransport(bucket_bytes)
    group = _FakeCommunicator()
    transport.group, transport.device = group, torch.device("cpu")

    # Learner rank 0: what learner/weight_stream.send_weights does with each gathered bucket.
    group._sending = True
    send = transport.sender(plan)
    for bucket in plan.buckets():
        send(bucket, [master[name] for name, _, _ in bucket])
    if bucket_bytes >= 8 << 10:
        # Buckets fit vLLM's packed buffer (one bucket's size): one broadcast per bucket.
        assert len(group.sent_sizes) == len(plan.bucket_sizes)

    # A rollout engine: vLLM's NCCLWeightTransferEngine, set up as the init info tells it.
    (init,) = [_vllm_engine().parse_init_info(i) for i in transport.init_infos({"master_address": "h",
                                                                                 "master_port": 1}, [1])]
    loaded = {}

    class Model:
        def load_weights(self, weights):
            for name, tensor in weights:
                loaded[name] = tensor.clone()

    engine = _vllm_engine()
    engine.model, engine.device, engine.model_update_group = Model(), torch.device("cpu"), group
    engine.packed, engine.packed_buffer_size_bytes, engine.packed_num_buffers = (
        init.packed, init.packed_buffer_size_bytes, init.packed_num_buffers)
    group._sending = False
    for update in transport.update_infos(plan):
        engine.update_weights(update)

    assert not group.wire
    assert list(loaded) == plan.names
    for name, tensor in master.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16))


def test_learner_refuses_nccl_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="weights.transport=gloo"):
        weight_transport("nccl", 1 << 20).open("127.0.0.1", 2, 10)


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Engine:
    def __init__(self, log, name):
        async def join(info):
            log.append((name, "join", info))

        async def receive(updates, version):
            log.append((name, "receive", updates, version))

        self.join_weight_group, self.receive_weights = _Remote(join), _Remote(receive)


class _Slot:
    def __init__(self, log, name, ranks):
        self.name, self.restarts, self.info, self.handle = name, 0, {"weight_ranks": ranks}, _Engine(log, name)


class _Learner:
    def __init__(self, hang_open=False):
        self.hang_open, self.opened = hang_open, []

    async def weight_plan(self, dtype, bucket_bytes):
        from dataclasses import asdict

        return asdict(plan_buckets([(n, dtype, s) for n, _, s in _params()], bucket_bytes))

    async def open_weight_group(self, transport, world_size, timeout_s):
        import asyncio

        if self.hang_open:
            await asyncio.sleep(3600)
        self.opened.append((transport.name, world_size))
        return {"master_address": "10.0.0.5", "master_port": 41234}

    async def join_weight_group(self):
        pass

    async def send_weights(self, plan):
        return 1


def test_the_broadcaster_forms_an_nccl_group_of_every_engines_ranks_and_sends_per_bucket_updates():
    import asyncio

    from actors.weight_sync import WeightBroadcaster

    log, learner = [], _Learner()
    broadcaster = WeightBroadcaster(lambda: learner, transport="nccl", dtype="bfloat16", bucket_bytes=8 << 10,
                                    timeout_s=5)
    slots = [_Slot(log, "rollout-0", 1), _Slot(log, "rollout-1", 2)]
    asyncio.run(broadcaster.push(3, slots))
    assert learner.opened == [("nccl", 4)]
    joins = {name: _vllm_engine().parse_init_info(info) for name, kind, info, *_ in log if kind == "join"}
    assert (joins["rollout-0"].rank_offset, joins["rollout-1"].rank_offset) == (1, 2)
    receives = [entry for entry in log if entry[1] == "receive"]
    assert len(receives) == 2 and all(version == 3 for *_, version in receives)
    plan = plan_buckets(_params(), 8 << 10)
    assert [len(_vllm_engine().parse_update_info(u).names) for u in receives[0][2]] == plan.bucket_sizes


def test_a_learner_still_blocked_in_an_earlier_push_fails_the_next_one_named():
    import asyncio

    from actors.weight_sync import WeightBroadcaster, WeightPushFailed

    broadcaster = WeightBroadcaster(lambda: _Learner(hang_open=True), transport="nccl", dtype="bfloat16",
                                    bucket_bytes=8 << 10, timeout_s=0.01)
    broadcaster.timeout_s = -29.9  # the bound is timeout_s + 30 s: 0.1 s here
    with pytest.raises(WeightPushFailed, match="learner rank 0 did not open the weight group"):
        asyncio.run(broadcaster.push(1, [_Slot([], "rollout-0", 1)]))
