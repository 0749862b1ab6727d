"""Weight-sync benchmark: the gloo transport's two paths vs the file path, side by side in one run.

Random-init models of the SmolLM2-135M, Qwen2-0.5B and Qwen2-1.5B shapes (fp32 master weights
for the first two, bf16 for 1.5B so it fits beside other work), sent in bf16 (the rollout
dtype) to 1, 2 and 4 receiving workers. The sender is the learner's real code
(learner/weight_stream.py: plan, cast+pack per bucket, then rollout/weight_wire.py). The
receivers are plain torch processes speaking the receive side of the project's vLLM engine
(rollout/weight_wire.py `receive`): four vLLM engines would not fit beside each other on a
small CPU machine, and what is measured here is the transport, not vLLM's loader (with --load,
each receiver also copies every bucket into a buffer of the model's size, as a loader copies
into the engine's parameters; that copy is the same whatever the transport).

Per shape it prints:
- native: seconds from the first bucket to every receiver holding the last one, on the path a
  run takes for workers on the learner's node (weights.local_shm: each bucket packed once into
  shared memory and mapped by every receiver);
- gloo: the same over the gloo broadcast (weights.local_shm=false, and the path for workers on
  other nodes: TCP, here over loopback);
- file: the `weights.transport: file` path as it runs for workers on other nodes: the learner
  writes one safetensors file, then each worker in turn pulls its bytes through the learner,
  writes its own copy and loads it (the learner actor serves the reads one after another);
- floor: one in-memory copy of the same bytes, measured in the same run;
- ratios: native/floor, file/native, and native with 4 workers / native with 1 (the same for gloo).

The last line is for the 0.5B shape:  speedup_vs_file=X scale_4v1=Y floor_ratio=Z
(speedup and floor ratio at 4 workers; file with 4 workers is skipped when --file-max-gb is
smaller than the bytes times five, in which case the speedup is taken at the largest worker
count that ran).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, master dtype)
    "135m": (576, 30, 9, 3, 1536, 49152, "float32"),
    "0.5b": (896, 24, 14, 2, 4864, 151936, "float32"),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, "bfloat16"),
}


def build_model(shape: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab, dtype = SHAPES[shape]
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    return model


def _receiver(inbox, outbox, load: bool = False) -> None:
    """A worker's receive side: join the group, take each version's buckets, report when done."""
    import queue

    import torch
    from safetensors.torch import load_file

    from rollout.weight_wire import GroupAddress, UpdatePlan, join_group, receive

    # One thread each: up to four receivers share this machine's cores (OpenMP threads of several
    # processes spinning on two cores would measure the oversubscription, not the transport).
    torch.set_num_threads(1)
    parent = os.getppid()
    group = dest = None
    while True:
        try:
            cmd, arg = inbox.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # the benchmark was killed: do not outlive it
                return
            continue
        if cmd == "stop":
            return
        if cmd == "join":
            group = join_group(GroupAddress(**arg))
            outbox.put("joined")
        elif cmd == "leave":
            group.shutdown()
            group = None
            outbox.put("left")
        elif cmd == "recv":
            n = 0
            plan = UpdatePlan(**arg)
            if load:
                # Allocated once, as an engine's parameters are: a fresh buffer would add its page faults.
                if dest is None or dest.numel() != plan.nbytes():
                    dest = torch.zeros(plan.nbytes(), dtype=torch.uint8)
                at = 0
            for bucket in receive(group, plan):
                n += len(bucket)
                if load:
                    for _, t in bucket:
                        flat = t.reshape(-1).view(torch.uint8)
                        dest[at: at + flat.numel()].copy_(flat)
                        at += flat.numel()
            group.barrier().wait()
            outbox.put(n)
        elif cmd == "file":
            # The file path for a worker on another node: pull the bytes, write a copy, load it.
            source, own = arg
            blob = Path(source).read_bytes()
            Path(own).write_bytes(blob)
            del blob
            n = len(load_file(own))
            os.unlink(own)
            outbox.put(n)


class Receivers:
    def __init__(self, n: int, load: bool = False):
        ctx = mp.get_context("spawn")
        self.pipes = [(ctx.Queue(), ctx.Queue()) for _ in range(n)]
        self.procs = [ctx.Process(target=_receiver, args=(*p, load), daemon=True) for p in self.pipes]
        for p in self.procs:
            p.start()

    def ask(self, k: int, cmd: str, args: list) -> None:
        for i in range(k):
            self.pipes[i][0].put((cmd, args[i]))

    def answers(self, k: int, timeout: float = 600) -> list:
        return [self.pipes[i][1].get(timeout=timeout) for i in range(k)]

    def stop(self) -> None:
        for inbox, _ in self.pipes:
            inbox.put(("stop", None))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def time_native(model, plan, receivers: Receivers, k: int, reps: int, local_shm: bool) -> float:
    import torch  # noqa: F401

    from learner.weight_stream import send_weights
    from rollout.weight_transport import GlooTransport

    # The plan is already cut into buckets; the gloo sender takes them as they come.
    transport = GlooTransport(bucket_bytes=0, local_shm=local_shm, version_bytes=plan.nbytes())
    address = transport.open("127.0.0.1", k + 1, 300)
    receivers.ask(k, "join", transport.init_infos(address, [1] * k))
    transport.join()
    group = transport.group
    receivers.answers(k)
    assert group.local_receivers == (k if local_shm else 0), "the receivers did not take the path asked for"
    times = []
    for _ in range(reps):
        receivers.ask(k, "recv", [asdict(plan)] * k)
        t0 = time.perf_counter()
        send_weights(model, plan, transport, zero3=False, is_sender=True)
        group.barrier().wait()
        times.append(time.perf_counter() - t0)
        assert all(n == len(plan.names) for n in receivers.answers(k))
    receivers.ask(k, "leave", [None] * k)
    receivers.answers(k)
    group.shutdown()
    return statistics.median(times)


def time_file(model, receivers: Receivers, k: int, reps: int, tmp: Path) -> float:
    import torch
    from safetensors.torch import save_file

    from learner.weight_stream import TIED_FROM, TIED_HEAD, named_tensors

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        # What the learner's export does: the whole state dict in the rollout dtype, one file.
        sd = {n: t.detach().to(torch.bfloat16).clone() for n, t in named_tensors(model)}
        sd[TIED_HEAD] = sd[TIED_FROM].clone()
        path = tmp / "policy.safetensors"
        save_file(sd, str(path))
        del sd
        for i in range(k):  # one read through the learner actor after another
            receivers.pipes[i][0].put(("file", (str(path), str(tmp / f"worker-{i}.safetensors"))))
            receivers.pipes[i][1].get(timeout=600)
        times.append(time.perf_counter() - t0)
        path.unlink()
    return statistics.median(times)


def time_floor(nbytes: int, reps: int) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="135m,0.5b,1.5b")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--file-max-gb", type=float, default=1.5,
                    help="skip the file path for shapes whose bf16 bytes exceed this (it needs them several times)")
    ap.add_argument("--load", action="store_true",
                    help="receivers also copy every bucket into a model-sized buffer (what a loader does)")
    args = ap.parse_args(argv)
    import torch

    from learner.weight_stream import weight_plan

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    workers = [int(w) for w in args.workers.split(",")]
    receivers = Receivers(max(workers), load=args.load)
    summary = {}
    try:
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        with tempfile.TemporaryDirectory(prefix="rapo-wsync-", dir=shm) as d:
            for shape in args.shapes.split(","):
                model = build_model(shape)
                plan = weight_plan(model, "bfloat16", int(args.bucket_mb * (1 << 20)), tied=True)
                nbytes = plan.nbytes()
                floor = time_floor(nbytes, args.reps)
                print(f"[{shape}] {nbytes / 1e9:.2f} GB in bf16, {len(plan.bucket_sizes)} buckets of <= "
                      f"{args.bucket_mb:.0f} MB; floor (one in-memory copy) {floor:.3f} s", flush=True)
                native, gloo, file = {}, {}, {}
                for k in workers:
                    native[k] = time_native(model, plan, receivers, k, args.reps, local_shm=True)
                    gloo[k] = time_native(model, plan, receivers, k, args.reps, local_shm=False)
                    line = (f"[{shape}] workers={k} native={native[k]:.3f}s ({nbytes / native[k] / 1e9:.2f} GB/s) "
                            f"floor_ratio={native[k] / floor:.2f} gloo={gloo[k]:.3f}s "
                            f"(floor_ratio {gloo[k] / floor:.2f})")
                    if nbytes / 1e9 <= args.file_max_gb:
                        file[k] = time_file(model, receivers, k, max(1, args.reps - 1), Path(d))
                        line += f" file={file[k]:.3f}s speedup_vs_file={file[k] / native[k]:.2f}"
                    print(line, flush=True)
                top = max(workers)
                fk = max(file) if file else None
                summary[shape] = {
                    "speedup_vs_file": file[fk] / native[fk] if fk else float("nan"),
                    "scale_4v1": native[top] / native[min(workers)],
                    "floor_ratio": native[top] / floor,
                }
                print(f"[{shape}] scale_{top}v{min(workers)}={summary[shape]['scale_4v1']:.2f} "
                      f"(gloo {gloo[top] / gloo[min(workers)]:.2f})", flush=True)
                del model
    finally:
        receivers.stop()
    s = summary.get("0.5b") or next(iter(summary.values()))
    print(f"speedup_vs_file={s['speedup_vs_file']:.2f} scale_4v1={s['scale_4v1']:.2f} "
          f"floor_ratio={s['floor_ratio']:.2f}")


if __name__ == "__main__":
    main()
