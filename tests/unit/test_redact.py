"""Secrets never reach MLflow params or config error messages."""

from __future__ import annotations

from cluster.redact import mask_url_passwords
from cluster.tracking import safe_params


def test_secret_valued_keys_are_dropped_but_their_sources_and_counts_kept():
    params = {
        "rewards.judge.api_key": "sk-live-123",
        "extra.hf_token": "hf_abc",
        "redis.password": "pw",
        "rewards.judge.api_key_env": "RAPO_JUDGE_API_KEY",
        "redis.password_env": "RAPO_REDIS_PASSWORD",
        "rewards.judge.max_tokens": 1024,
        "rewards.judge.tokens_per_minute": None,
        "rewards.judge.require_api_key": True,
    }
    out = safe_params(params)
    assert not {"rewards.judge.api_key", "extra.hf_token", "redis.password"} & set(out)
    assert (
        out["rewards.judge.api_key_env"] == "RAPO_JUDGE_API_KEY" and out["redis.password_env"] == "RAPO_REDIS_PASSWORD"
    )
    assert out["rewards.judge.max_tokens"] == "1024" and out["rewards.judge.require_api_key"] == "True"


def test_url_passwords_are_masked_and_the_rest_of_the_url_kept():
    assert mask_url_passwords("redis://:s3cr3t@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert mask_url_passwords("see https://bob:pa55@mlflow:5000/x") == "see https://bob:***@mlflow:5000/x"
    assert mask_url_passwords("http://judge:8000/v1") == "http://judge:8000/v1"
    assert safe_params({"tracking.uri": "https://bob:pa55@mlflow:5000"}) == {
        "tracking.uri": "https://bob:***@mlflow:5000"
    }
