from pathlib import Path

import pytest

from cluster.config import ConfigError, RunConfig, apply_overrides, flatten, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "smoke.yaml"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)
    assert cfg.train_batch_size % cfg.learner.num_ranks == 0


def test_overrides_are_typed_and_nested():
    cfg = load_config(CONFIGS / "smoke.yaml", ["learner.num_ranks=2", "learner.zero_stage=3", "data.seed=7", "pipeline.mode=sync"])
    assert cfg.learner.num_ranks == 2 and cfg.learner.zero_stage == 3 and cfg.data.seed == 7
    assert cfg.micro_batches_per_rank == cfg.train_batch_size // 2 // cfg.learner.micro_batch_size


def test_misspelt_key_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  zero_stag: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "learner.zero_stag" in str(e.value) and "unknown key" in str(e.value)


def test_misspelt_override_names_the_field():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pipeline.stepz=3"])
    assert "pipeline.stepz" in str(e.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("learner.zero_stage=5", "learner.zero_stage"),
        ("pipeline.steps=0", "pipeline.steps"),
        ("rollout.temperature=-1", "rollout.temperature"),
        ("pipeline.samples_per_question=1", "pipeline.samples_per_question"),
        ("learner.lr=abc", "learner.lr"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_batch_that_does_not_split_over_ranks_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pipeline.questions_per_step=3", "pipeline.samples_per_question=3", "learner.num_ranks=2"])
    assert "learner.num_ranks" in str(e.value)


def test_jsonl_data_needs_a_corpus(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.path={tmp_path / 'q.jsonl'}"])
    assert "tools.corpus_path" in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError):
        apply_overrides({"learner": 3}, ["learner.lr=1"])


def test_model_path_switches_source(tmp_path):
    cfg = load_config(None, [f"model.path={tmp_path}"])
    assert cfg.model.source == "path"


def test_flatten_gives_dotted_keys():
    flat = flatten(RunConfig())
    assert flat["learner.zero_stage"] == RunConfig().learner.zero_stage
    assert "redis.url" in flat and all("." in k for k in flat if k != "name")


def test_a_password_in_the_redis_url_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["redis.url=redis://:hunter2-secret@10.0.0.5:6379/0"])
    assert "redis.url" in str(e.value) and "RAPO_REDIS_PASSWORD" in str(e.value)
    assert "hunter2-secret" not in str(e.value)
    assert load_config(None, ["redis.url=redis://10.0.0.5:6379/0"]).redis.url == "redis://10.0.0.5:6379/0"


def test_weights_transport_defaults_to_vllms_protocol_and_refuses_what_cannot_run():
    assert RunConfig().weights.resolve("vllm", "deepspeed") == "gloo"
    assert RunConfig().weights.resolve("simulated", "simulated") == "file"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["weights.transport=gloo", "rollout.engine=simulated", "learner.backend=simulated"])
    assert "weights.transport=file" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["weights.transport=nccl"])
    assert "weights.transport=gloo" in str(e.value)
    assert RunConfig().weights.bucket_bytes(gpu=True) == 256 << 20
