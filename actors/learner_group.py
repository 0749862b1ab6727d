"""The learner group: W LearnerWorker actors forming one torch.distributed / DeepSpeed group.

Every call that is a collective under ZeRO (train step, weight export, checkpoint) is sent
to all ranks at once and awaited together; calling ranks one after another deadlocks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray

from learner.batch import RankPlan
from rollout.weights import WeightRef


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class LearnerWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.trainer = None

    def rendezvous(self) -> tuple[str, int]:
        """Address and a free port on this node, for rank 0 to host the process group."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(
        self, cfg, model_dir: str, master_addr: str, master_port: int, per_rank_micro_batches: int, temperature: float
    ) -> dict:
        if cfg.backend == "simulated":
            from learner.sim_trainer import SimulatedTrainer

            self.trainer = SimulatedTrainer(cfg.sim_step_s, self.rank)
        else:
            from learner.trainer import DistSpec, Trainer

            dist = DistSpec(self.rank, self.world_size, master_addr, master_port)
            self.trainer = Trainer(
                cfg, Path(model_dir), dist, per_rank_micro_batches=per_rank_micro_batches, temperature=temperature
            )
        precision = getattr(self.trainer, "precision", None)
        return {
            "rank": self.rank,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpu": self.trainer.gpu,
            "precision": precision.name if precision else "simulated",
            "precision_reason": precision.reason if precision else "",
            "packed": getattr(self.trainer, "packed", None),
            "attention": getattr(self.trainer, "attention", None),
        }

    def train_step(self, plan: RankPlan) -> dict:
        return self.trainer.train_step(plan)

    def export_weights(self, path: str, dtype: str, keep: int = 2) -> int:
        n = self.trainer.export_weights(Path(path), dtype)
        if self.rank == 0:
            # Older versions are no longer read by any worker; shared memory is precious.
            old = sorted(Path(path).parent.glob("policy-v*.safetensors"), key=lambda p: p.stat().st_mtime)
            for stale in old[:-keep]:
                stale.unlink(missing_ok=True)
        return n

    def weight_plan(self, dtype: str, bucket_bytes: int) -> dict:
        from dataclasses import asdict

        return asdict(self.trainer.weight_plan(dtype, bucket_bytes))

    def open_weight_group(self, transport, world_size: int, timeout_s: float) -> dict:
        """Rank 0: host the rendezvous of a new weight group on this node, over `transport`
        (rollout/weight_transport.py); returns the address the receivers join."""
        self.close_weight_group()
        self._weight_transport = transport
        if hasattr(transport, "run"):  # gloo: shared-memory files are named by run
            transport.run = ray.get_runtime_context().namespace or ""
        address = transport.open(ray.util.get_node_ip_address(), world_size, timeout_s)
        return {**address, "node_id": ray.get_runtime_context().get_node_id()}

    def join_weight_group(self) -> int:
        """Rank 0: join the group opened last; returns once every receiver has joined, with how many
        of them map buckets from shared memory (gloo on the learner's node)."""
        self._weight_transport.join()
        return getattr(self._weight_transport.group, "local_receivers", 0)

    def close_weight_group(self) -> None:
        transport = getattr(self, "_weight_transport", None)
        if transport is not None:
            transport.close()

    def send_weights(self, plan: dict) -> int:
        """Every rank (a collective under ZeRO-3); rank 0 sends to the weight group."""
        from rollout.weight_wire import UpdatePlan

        try:
            return self.trainer.send_weights(UpdatePlan(**plan), getattr(self, "_weight_transport", None))
        except Exception:
            # A broken group (a receiver died mid-transfer) is never reused: the next push re-forms it.
            self.close_weight_group()
            raise

    def read_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self.trainer.save_checkpoint(Path(directory), tag)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self.trainer.load_checkpoint(Path(directory), tag)

    def close(self) -> None:
        self.close_weight_group()  # rank 0: its shared-memory files go with it
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None


class LearnerGroup:
    """Driver-side handle: creates the ranks, wires the process group, fans calls out."""

    def __init__(self, cfg, *, num_cpus: float, num_gpus: float):
        self.cfg = cfg
        self.world_size = cfg.num_ranks
        self.workers = [
            LearnerWorker.options(
                name=f"learner-{r}", num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(cfg.resources) or None
            ).remote(r, self.world_size)
            for r in range(self.world_size)
        ]
        self.node_id = None

    async def setup(self, model_dir: str, per_rank_micro_batches: int, temperature: float) -> list[dict]:
        addr, port = await self.workers[0].rendezvous.remote()
        infos = await _gather(
            [w.setup.remote(self.cfg, model_dir, addr, port, per_rank_micro_batches, temperature) for w in self.workers]
        )
        self.node_id = infos[0]["node_id"]
        return infos

    async def train_step(self, plans: list[RankPlan]) -> list[dict]:
        return await _gather([w.train_step.remote(p) for w, p in zip(self.workers, plans)])

    async def publish(self, weights_dir: str, version: int, dtype: str) -> WeightRef:
        path = os.path.join(weights_dir, f"policy-v{version}.safetensors")
        await _gather([w.export_weights.remote(path, dtype) for w in self.workers])
        return WeightRef(version=version, path=path, node_id=self.node_id, source=self.workers[0])

    async def weight_plan(self, dtype: str, bucket_bytes: int) -> dict:
        return await self.workers[0].weight_plan.remote(dtype, bucket_bytes)

    async def open_weight_group(self, transport, world_size: int, timeout_s: float) -> dict:
        return await self.workers[0].open_weight_group.remote(transport, world_size, timeout_s)

    async def join_weight_group(self) -> int:
        return await self.workers[0].join_weight_group.remote()

    async def send_weights(self, plan: dict) -> int:
        return (await _gather([w.send_weights.remote(plan) for w in self.workers]))[0]

    async def save_checkpoint(self, directory: str, tag: str) -> None:
        await _gather([w.save_checkpoint.remote(directory, tag) for w in self.workers])

    async def load_checkpoint(self, directory: str, tag: str) -> None:
        await _gather([w.load_checkpoint.remote(directory, tag) for w in self.workers])

    async def close(self) -> None:
        try:
            await _gather([w.close.remote() for w in self.workers])
        finally:
            for w in self.workers:
                ray.kill(w)


async def _gather(refs):
    import asyncio

    return list(await asyncio.gather(*refs))
