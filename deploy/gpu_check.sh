#!/usr/bin/env bash
# GPU check of the learner: a few DeepSpeed ZeRO steps (bf16, NCCL) of a random-init model with
# Qwen3-0.6B's (or Qwen3-4B's) shape through learner.trainer.Trainer, packed micro-batches by
# default; prints tokens/s, step time, peak GPU memory and MFU (formula in deploy/gpu_check.py).
# Needs no internet and no model download.
#
#   deploy/gpu_check.sh                      # one GPU, 8 x 2048 tokens per step, ZeRO-3, packed
#   deploy/gpu_check.sh --nproc 4            # 4 GPUs of this machine (torchrun, one rank per GPU)
#   deploy/gpu_check.sh --zero-stage 2 --batch 16 --micro-batch 8 --peak-tflops 989
#   deploy/gpu_check.sh --shape qwen3-4b --no-packing          # the 4B shape, one padded row per sequence
#   deploy/gpu_check.sh --lengths longtail --max-tokens 16384  # long-tailed lengths, token-budget micro-batches
#   deploy/gpu_check.sh --matrix             # 0.6B and 4B x ZeRO-2/3 x activation checkpointing on/off: MFU table
#   deploy/gpu_check.sh --cpu                # plumbing check without a GPU (tiny model, gloo)
#   deploy/gpu_check.sh --cpu --matrix       # dry run of the matrix on the tiny model
#
# Then (unless --no-weight-sync) the learner's side of a weight push for the Qwen3-0.6B and 4B
# shapes: bucketed gather + cast + pack, and with 2+ GPUs the NCCL broadcast to a plain-torch
# receiver on GPU 1 (deploy/gpu_weight_sync.py).
#
# Any other option goes to gpu_check.py (see `python deploy/gpu_check.py --help`). PYTHON picks
# the interpreter (default: the repo's .venv if present, else python3). Exits non-zero on failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

cpu=0
nproc=1
weight_sync=1
matrix=0
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) cpu=1; args+=("$1"); shift ;;
        --no-weight-sync) weight_sync=0; shift ;;
        --matrix) matrix=1; args+=("$1"); shift ;;
        --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
        --nproc=*) nproc="${1#--nproc=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ $cpu -eq 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
    echo "== CPU plumbing check (no GPU used)"
else
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "error: nvidia-smi not found: no NVIDIA driver on this machine (use --cpu for a plumbing check)" >&2
        exit 2
    fi
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
fi

echo "== versions"
"$PYTHON" - <<'PY'
import platform
import torch
print(f"python       {platform.python_version()}")
print(f"torch        {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}        {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    print(f"nccl         {'.'.join(map(str, torch.cuda.nccl.version()))}")
import transformers
print(f"transformers {transformers.__version__}")
import deepspeed
print(f"deepspeed    {deepspeed.__version__}")
PY

echo "== learner steps"
if [[ $matrix -eq 1 ]]; then
    # One process per case; gpu_check.py starts torchrun itself for --nproc > 1.
    "$PYTHON" "$here/gpu_check.py" --nproc "$nproc" ${args[@]+"${args[@]}"}
elif [[ $nproc -gt 1 ]]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$here/gpu_check.py" \
        ${args[@]+"${args[@]}"}
else
    "$PYTHON" "$here/gpu_check.py" ${args[@]+"${args[@]}"}
fi

[[ $weight_sync -eq 1 ]] || exit 0
echo "== weight sync: the learner's bucketed gather + cast (+ NCCL broadcast to a plain-torch receiver on GPU 1)"
ws_args=()
[[ $cpu -eq 1 ]] && ws_args+=(--cpu --shapes tiny)
gpus=0
[[ $cpu -eq 1 ]] || gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)"
if [[ $gpus -ge 2 ]]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 "$here/gpu_weight_sync.py" \
        ${ws_args[@]+"${ws_args[@]}"}
fi
exec "$PYTHON" "$here/gpu_weight_sync.py" ${ws_args[@]+"${ws_args[@]}"}
