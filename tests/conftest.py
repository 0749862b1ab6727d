"""Shared fixtures: the model cache, tokenizer and tiny model folders, a real Redis server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
