#!/usr/bin/env python3
"""GPU check of the learner's side of a weight push: bucketed gather + cast + NCCL broadcast.

Random-init models of the Qwen3-0.6B and Qwen3-4B shapes (fp32 master weights on the GPU, as the
learner keeps them), streamed through the learner's own code (learner/weight_stream.py: plan,
gather per bucket under ZeRO-3, cast to bf16 while packing one flat buffer, one broadcast per
bucket) to a plain-torch receiver (vLLM does not travel to the GPU machine): rank 1 of an NCCL
group, receiving each bucket into a fresh buffer as the rollout engine does.

NCCL cannot put two ranks on one GPU: with a single GPU the broadcast is skipped and the check
times the gather + cast + pack alone (`pack_s`), beside a device-to-device copy of the same
bytes (`floor_s`). With two or more GPUs it also times the broadcast to rank 1 on GPU 1.

  torchrun --standalone --nproc_per_node 2 deploy/gpu_weight_sync.py      # 2 GPUs: sender + receiver
  python deploy/gpu_weight_sync.py                                        # 1 GPU: pack + cast only
  python deploy/gpu_weight_sync.py --cpu --shapes tiny                    # plumbing check (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {
    # hidden, layers, heads, kv heads, head dim, intermediate, vocab, tied
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072, 151936, True),
    "qwen3-4b": (2560, 36, 32, 8, 128, 9728, 151936, True),
    "tiny": (64, 2, 4, 2, 16, 128, 1024, True),
}


class _Group:
    """torch.distributed's default group behind the interface weight_wire sends through."""

    def broadcast(self, tensor, root):
        import torch.distributed as dist

        return dist.broadcast(tensor, src=root, async_op=True)


def build(shape: str, device):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads, kv, head_dim, inter, vocab, tied = SHAPES[shape]
    cfg = Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device=device).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shape(shape: str, rank: int, world: int, device, bucket_bytes: int, reps: int) -> dict | None:
    import torch
    import torch.distributed as dist

    from learner.weight_stream import gathered_buckets, weight_plan
    from rollout.weight_wire import layout, send_bucket, send_buffer, views

    model = build(shape, device) if rank == 0 else None
    plan = [weight_plan(model, "bfloat16", bucket_bytes, tied=True)] if rank == 0 else [None]
    if world > 1:
        dist.broadcast_object_list(plan, src=0)
    plan = plan[0]
    group = _Group() if world > 1 else None
    out = {"shape": shape, "bytes": plan.nbytes(), "buckets": len(plan.bucket_sizes)}
    if rank == 0:
        scratch = send_buffer(plan, device)
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            for bucket, tensors in zip(plan.buckets(), gathered_buckets(model, plan, zero3=False)):
                _, size = layout(bucket)
                for view, t in zip(views(scratch[:size], bucket), tensors):
                    view.copy_(t.detach().reshape(view.shape))
            sync(device)
            times.append(time.perf_counter() - t0)
        out["pack_s"] = min(times)
        src = torch.empty(plan.nbytes(), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        out["floor_s"] = time.perf_counter() - t0
        del src, dst
    if world > 1:
        times = []
        for _ in range(reps):
            dist.barrier()
            sync(device)
            t0 = time.perf_counter()
            if rank == 0:
                for bucket, tensors in zip(plan.buckets(), gathered_buckets(model, plan, zero3=False)):
                    send_bucket(group, bucket, tensors, scratch)
            else:
                for bucket in plan.buckets():
                    buf = torch.empty(layout(bucket)[1], dtype=torch.uint8, device=device)
                    dist.broadcast(buf, src=0)
                    views(buf, bucket)
            sync(device)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        out["push_s"] = min(times)
        out["push_gb_s"] = plan.nbytes() / out["push_s"] / 1e9
    return out if rank == 0 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-4b")
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="plumbing check on CPU (gloo)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.cpu:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --cpu for a plumbing check)", file=sys.stderr)
            return 2
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("gloo" if args.cpu else "nccl")
    results = []
    for shape in args.shapes.split(","):
        r = run_shape(shape, rank, world, device, int(args.bucket_mb * (1 << 20)), args.reps)
        if r is not None:
            results.append(r)
            line = (f"weight sync {shape}: {r['bytes'] / 1e9:.2f} GB bf16 in {r['buckets']} buckets; gather+cast+pack "
                    f"{r['pack_s']:.3f} s (floor, one device copy: {r['floor_s']:.3f} s)")
            if "push_s" in r:
                line += f"; push to 1 receiver {r['push_s']:.3f} s ({r['push_gb_s']:.1f} GB/s)"
            print(line, flush=True)
        if not args.cpu:
            torch.cuda.empty_cache()
    if rank == 0 and args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
