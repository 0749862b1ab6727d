"""The whole run's configuration: typed, validated before anything starts.

Loaded from YAML, then ``section.key=value`` overrides from the command line. Unknown keys
and bad values raise ConfigError with the dotted path of every offending field; a file that
is not UTF-8, not YAML or says a key twice names the file and the line; an override that goes
below a value (``rollout.max_model_len.x=1``) says the path is wrong. Numbers must be finite.
`check_local_files` checks what a command is about to read from this machine (model.path, data
and corpus files); it is separate because a config submitted to a cluster names its files there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.redact import mask_url_passwords
from rewards.judge_client import JudgeSettings
from rollout.tools.extractor import ExtractorSettings
from rollout.tools.web import WebToolsSettings


class ConfigError(ValueError):
    pass


class Section(BaseModel):
    # inf and nan pass gt/ge bounds (inf > 0) and then poison every step: no such value is ever meant.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAPO_CACHE_DIR", Path.home() / ".cache" / "rapo-cluster"))


class WarmStartConfig(Section):
    """Short supervised pass on generated successful demo-world episodes (SmolLM2 only)."""

    steps: int = Field(6, ge=0, description="SFT optimizer steps; 0 keeps the converted model as is")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    hops: list[int] = Field(default_factory=lambda: [1], description="question hops used for demonstrations")
    seed: int = 1234
    autocast_bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast for the warm start (CPU); auto: only where the CPU does bf16 natively"
    )


class TinyModelConfig(Section):
    hidden: int = Field(64, ge=16)
    layers: int = Field(2, ge=1)


class ModelConfig(Section):
    source: Literal["smollm2", "tiny", "path"] = "smollm2"
    path: Path | None = Field(None, description="a Hugging Face causal-LM folder; implies source=path")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @model_validator(mode="after")
    def _path_means_path(self) -> ModelConfig:
        if self.path is not None and self.source != "path":
            object.__setattr__(self, "source", "path")
        if self.source == "path" and self.path is None:
            raise ValueError("model.source is 'path' but model.path is not set")
        return self


class DemoWorldConfig(Section):
    countries: int = Field(120, ge=8, description="fictional countries; cities and people scale with it")
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    hops: list[int] = Field(default_factory=lambda: [1, 2], description="question hops (1..3) in the RL set")


class DataConfig(Section):
    source: Literal["demo", "jsonl"] = "demo"
    seed: int = Field(0, description="seed of the demo world (entities, corpus, questions, split)")
    demo: DemoWorldConfig = Field(default_factory=DemoWorldConfig)
    path: Path | None = Field(None, description="JSONL of {id, question, answer, aliases?} training rows")
    eval_path: Path | None = Field(None, description="JSONL held-out rows (default: a split of `path`)")
    eval_size: int = Field(32, ge=1, description="held-out questions used for accuracy")
    train_size: int | None = Field(
        None, ge=1, description="RL training pool: this many training questions, taken evenly over hop counts "
        "(default: all); a small pool makes a short run revisit questions, so replay and pruning act",
    )

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> DataConfig:
        if self.path is not None and self.source != "jsonl":
            object.__setattr__(self, "source", "jsonl")
        if self.source == "jsonl" and self.path is None:
            raise ValueError("data.source is 'jsonl' but data.path is not set")
        return self


class LatencyModelConfig(Section):
    """GPU-scale timing for rollout.engine=simulated (rollout/sim_engine.py); the pipeline benchmark's model."""

    per_token_s: float = Field(0.001, ge=0, description="decode time per generated token per sequence")
    prefill_per_token_s: float = Field(0.00002, ge=0)
    slots: int = Field(16, ge=1, description="sequences one worker decodes at once")
    tokens_per_turn: int = Field(64, ge=1)
    pareto_alpha: float = Field(1.3, gt=0, description="tail of the tool-calls-per-episode distribution")
    min_tool_calls: int = Field(1, ge=0)
    max_tool_calls: int = Field(24, ge=0)
    weight_sync_s: float = Field(0.1, ge=0)


class RolloutConfig(Section):
    engine: Literal["auto", "vllm", "transformers", "simulated"] = Field(
        "auto", description="auto: vLLM if it imports, else transformers; simulated: the latency model (benchmarks)"
    )
    latency_model: LatencyModelConfig = Field(default_factory=LatencyModelConfig)
    num_workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker asks for, e.g. {rollout: 1} to land in a KubeRay worker group",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU (exact logprobs), bfloat16 on GPU"
    )
    max_model_len: int = Field(2048, ge=128)
    max_tokens_per_turn: int = Field(192, ge=8)
    max_tool_calls: int = Field(32, ge=1, description="the paper's cap per episode")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_concurrent_episodes: int = Field(64, ge=1, description="per rollout worker")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV cache")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = True


class ToolsConfig(Section):
    backend: Literal["corpus", "web"] = Field(
        "corpus", description="corpus: offline BM25 pages; web: search API + fetch"
    )
    web: WebToolsSettings = Field(default_factory=WebToolsSettings)
    extractor: ExtractorSettings | None = Field(
        None,
        description="goal-directed extraction for query_url through an OpenAI-compatible LLM (else passage ranking)",
    )
    latency_s: float = Field(0.0, ge=0, description="added to every tool call (benchmarks: a web API's latency)")
    corpus_path: Path | None = Field(
        None, description="JSONL of {url, title, text} pages searched by the corpus backend (default: the demo world)"
    )
    search_top_k: int = Field(3, ge=1, le=20, description="default top_k when a call gives none")
    max_top_k: int = Field(10, ge=1)
    snippet_chars: int = Field(90, ge=16)
    page_chars: int = Field(15000, ge=100, description="page text is clipped to this before extraction")
    passages_per_query: int = Field(2, ge=1)


class Stage2Config(Section):
    """Constants of the steerable step-level reward (docs/rapo.md §2.2; paper Eq. 8)."""

    c_search: float = Field(0.2, ge=0)
    c_query: float = Field(0.2, ge=0)
    cap_search: int = Field(8, ge=1, description="C_S: unique searches that earn the full search credit")
    cap_query: int = Field(16, ge=1, description="C_Q: unique queries that earn the full query credit")
    budget_verification: int = Field(1, ge=0, description="B_v: verifications allowed per claim")
    clamp_delta: bool = Field(False, description="floor the Δ terms of an incorrect rollout at 0")


class RewardsConfig(Section):
    stage: Literal[1, 2] = 1
    format_weight: float = Field(0.1, ge=0, le=1)
    judge: JudgeSettings | None = Field(
        None, description="an OpenAI-compatible judge (base_url, model, ...); unset uses the rule-based judge"
    )
    labeller: Literal["auto", "rule", "llm"] = Field(
        "auto", description="stage-2 step labels: auto = the LLM judge when one is configured, else the rules"
    )
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    num_actors: int = Field(2, ge=1, description="reward-labeller actors (judge-N)")
    num_cpus_per_actor: float = Field(0.1, ge=0, description="they mostly wait on HTTP")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each actor asks for, e.g. {judge: 1} to land in a KubeRay worker group",
    )
    max_in_flight_per_actor: int = Field(32, ge=1, description="trajectories one actor judges concurrently")
    chunk_size: int = Field(4, ge=1, description="trajectories per call to an actor")
    cache: bool = Field(True, description="cache LLM judgements in Redis by a hash of the judged content")

    @model_validator(mode="after")
    def _llm_labels_need_a_judge(self) -> RewardsConfig:
        if self.labeller == "llm" and self.judge is None:
            raise ValueError("rewards.labeller is 'llm' but rewards.judge is not set (give rewards.judge.base_url)")
        return self

    def uses_llm_labels(self) -> bool:
        return self.stage == 2 and self.judge is not None and self.labeller in ("auto", "llm")

    def spec(self):
        from rewards.scoring import RewardSpec

        s2 = self.stage2
        return RewardSpec(
            stage=self.stage,
            format_weight=self.format_weight,
            c_search=s2.c_search,
            c_query=s2.c_query,
            cap_search=s2.cap_search,
            cap_query=s2.cap_query,
            budget_verification=s2.budget_verification,
            clamp_delta=s2.clamp_delta,
        )


class LearnerConfig(Section):
    backend: Literal["deepspeed", "simulated"] = Field(
        "deepspeed", description="simulated: a step that only takes sim_step_s (pipeline benchmarks)"
    )
    sim_step_s: float = Field(1.0, ge=0, description="training step time of the simulated learner")
    algorithm: Literal["rapo", "grpo"] = Field(
        "rapo", description="rapo: advantage scaling + replay + pruning on; grpo: all three off (the ablation)"
    )
    adv_scaling: bool | None = Field(None, description="scale advantages by G/G_good (default: on for rapo)")
    replay: bool | None = Field(None, description="per-question replay buffer (default: on for rapo)")
    pruning: bool | None = Field(None, description="epoch-level pruning of solved questions (default: on for rapo)")
    replay_threshold: float = Field(
        0.5, description="a trajectory is stored when judged correct with reward above this"
    )
    replay_max_entries: int = Field(
        100_000, ge=1, description="questions kept in the buffer (least recently stored evicted)"
    )
    replay_on_policy: bool = Field(True, description="replayed samples get importance weight 1, as in the paper")
    prune_threshold: float = Field(0.9, gt=0, le=1, description="solve rate at which a question is pruned")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end of the run)")
    checkpoint_keep: int = Field(2, ge=1, description="checkpoints kept on disk")
    num_ranks: int = Field(1, ge=1)
    num_cpus_per_rank: float = Field(1.0, ge=0)
    num_gpus_per_rank: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each rank asks for, e.g. {learner: 1} to land in a KubeRay worker group",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads per rank (default: the node's cores / ranks; Ray would give 1)"
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="master weights and optimizer state")
    autocast_bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast for forward/backward (fp32 master weights); auto: only where the CPU/GPU "
        "does bf16 natively (on a CPU without AVX512_BF16/AMX it is emulated and several times slower than fp32)",
    )
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward/backward on one rank")
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="a micro-batch's sequences in one row, attention kept per sequence (false: pad each row); "
        "auto: packed where attention runs variable-length (flash-attention on a GPU), padded elsewhere: on CPU "
        "the packed row's block-diagonal mask costs more than the padding it saves (bench/learner_throughput.py)",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="cut micro-batches by this token budget, ranks balanced by tokens "
        "(replaces micro_batch_size; null: micro_batch_size sequences)",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="transformers attention of the learner; auto: flash_attention_2 on GPU if installed, else sdpa",
    )
    mini_batches: int = Field(1, ge=1, description="optimizer steps per batch (PPO mini-batches)")
    logprob_chunk_size: int = Field(512, ge=16, description="tokens per LM-head chunk (bounds logits memory)")
    gradient_checkpointing: bool = True
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    kl_coef: float = Field(0.001, ge=0, description="k3 KL to the initial policy; 0 loads no reference model")
    entropy_coef: float = Field(0.0, ge=0)
    behaviour_is_cap: float | None = Field(
        5.0, gt=0, description="cap of the decoupled-PPO weight pi_prox/pi_behaviour; null disables it"
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    adv_std: Literal["sample", "population"] = "sample"
    adv_eps: float = Field(1e-6, gt=0)
    timeout_s: float = Field(1800, gt=0, description="a learner call taking longer is an error")

    def feature(self, name: str) -> bool:
        """adv_scaling / replay / pruning: the explicit setting, else the algorithm's default."""
        value = getattr(self, name)
        return (self.algorithm == "rapo") if value is None else value


class PipelineConfig(Section):
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: a batch is generated only after the previous step (the baseline); async: overlap"
    )
    max_staleness: int = Field(
        1, ge=0, description="async: policy versions a sample may lag when trained (0 = on-policy)"
    )
    stale_action: Literal["drop", "downweight"] = Field("drop", description="what happens to an over-stale group")
    stale_weight: float = Field(0.5, ge=0, le=1, description="advantage multiplier of an over-stale group (downweight)")
    groups_per_worker: int | None = Field(
        None, ge=1, description="groups one rollout worker runs at once (default: max_concurrent_episodes / n)"
    )
    weight_sync_timeout_s: float = Field(300, gt=0, description="a worker not loading new weights in time is an error")
    max_group_reruns: int = Field(
        2, ge=0, description="re-runs of a group whose episodes all failed (or that raised) before it is dropped"
    )
    steps: int = Field(10, ge=1)
    questions_per_step: int = Field(4, ge=1)
    samples_per_question: int = Field(4, ge=2, description="n rollouts per question (the GRPO group)")
    eval_every: int = Field(0, ge=0, description="held-out eval every N steps (0: only at start and end)")
    eval_at_start: bool = Field(
        True, description="held-out eval of the starting policy before step 1 (summary's accuracy_initial)"
    )
    eval_temperature: float = Field(
        0.6, ge=0, description="sampling temperature of held-out evals (the paper evaluates at 0.6; 0 is greedy)"
    )
    seed: int = 0

    @property
    def staleness_bound(self) -> int:
        """Sync mode is the same pipeline with no overlap: a bound of 0 versions."""
        return self.max_staleness if self.mode == "async" else 0


class WeightsConfig(Section):
    """How a new policy version reaches the rollout engines (README, "Weight sync")."""

    transport: Literal["auto", "gloo", "nccl", "file"] = Field(
        "auto",
        description="gloo: vLLM's weight-transfer protocol through the project's rapo_gloo engine, one gloo "
        "broadcast per bucket (any machine, GPUs included); nccl: the same protocol through vLLM's own NCCL "
        "engine, one NCCL broadcast per bucket (vLLM engine, learner and every rollout worker on whole GPUs of "
        "their own; opt-in); file: one safetensors file per version pulled by each worker (kept for comparison); "
        "auto: gloo, or file for simulated engines",
    )
    bucket_mb: float | None = Field(
        None, gt=0, description="parameters gathered, cast and sent at a time (default: 256 MB on GPUs, 64 MB on CPUs)"
    )
    local_shm: bool = Field(
        True, description="gloo: rollout workers on learner rank 0's node map each bucket from /dev/shm (written "
        "once, no copy per worker) and only workers on other nodes take part in the broadcast; false: all of "
        "them receive it over gloo",
    )

    def resolve(self, engine_kind: str, learner_backend: str, learner_gpus: float = 0.0,
                rollout_gpus: float = 0.0) -> str:
        """The transport a run uses; ConfigError (one line, naming what to use) when it cannot run.

        `engine_kind` may still be auto (vLLM if it imports): the controller resolves again with the
        engine it found. The GPU counts are what each learner rank and rollout worker asks Ray for.
        """
        simulated = "simulated" in (engine_kind, learner_backend)
        if self.transport == "auto":
            return "file" if simulated else "gloo"
        if self.transport in ("gloo", "nccl") and simulated:
            raise ConfigError(
                f"weights.transport={self.transport} needs real weights: the simulated engine and learner take "
                "weights.transport=file (or auto)"
            )
        if self.transport == "nccl":
            if engine_kind == "transformers":
                raise ConfigError(
                    "weights.transport=nccl needs the vLLM engine (its NCCL weight-transfer engine receives); "
                    "the transformers engine takes weights.transport=gloo"
                )
            if learner_gpus < 1 or rollout_gpus < 1:
                raise ConfigError(
                    "weights.transport=nccl needs CUDA: learner.num_gpus_per_rank and rollout.num_gpus_per_worker "
                    f"of at least 1 (got {learner_gpus:g} and {rollout_gpus:g}; NCCL puts no two group members on "
                    "one GPU); use weights.transport=gloo where there are no GPUs"
                )
        return self.transport

    def bucket_bytes(self, gpu: bool) -> int:
        return int((self.bucket_mb or (256 if gpu else 64)) * (1 << 20))


class RedisConfig(Section):
    url: str | None = Field(None, description="redis://host:port/db (or rediss://); unset starts a local server")
    password_env: str = Field("RAPO_REDIS_PASSWORD", description="env var holding the password of `url`")
    namespace: str | None = Field(None, description="key prefix; defaults to the run id")
    executable: str = "redis-server"

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, url: str | None) -> str | None:
        # The config is saved with the run and logged to MLflow: a password in it would leak.
        if url is not None and urlsplit(url).password:
            raise ValueError(
                "a password in redis.url would be saved with the run; put it in the environment "
                "variable named by redis.password_env (default RAPO_REDIS_PASSWORD) instead"
            )
        return url


class RayConfig(Section):
    address: str | None = Field(None, description="existing cluster ('auto' or host:port); unset starts a local one")
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of a local cluster (default: what the actors need)"
    )
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=0, le=65535)
    namespace: str = "rapo"


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; unset uses a sqlite store in the output folder")
    experiment: str = "rapo"
    run_name: str | None = None
    plots: bool = True


class RunConfig(Section):
    name: str = "rapo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _weights_transport_fits(self) -> RunConfig:
        self.weights.resolve(self.rollout.engine, self.learner.backend, self.learner.num_gpus_per_rank,
                             self.rollout.num_gpus_per_worker)
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> RunConfig:
        batch = self.pipeline.questions_per_step * self.pipeline.samples_per_question
        split = self.learner.num_ranks * self.learner.mini_batches
        per_rank, rest = divmod(batch, split)
        if rest:
            raise ValueError(
                f"pipeline.questions_per_step * pipeline.samples_per_question = {batch} sequences per step "
                f"must split evenly into learner.mini_batches ({self.learner.mini_batches}) x learner.num_ranks "
                f"({self.learner.num_ranks})"
            )
        if self.learner.max_tokens_per_micro_batch is None and per_rank % self.learner.micro_batch_size:
            raise ValueError(
                f"each learner rank trains {per_rank} sequences per mini-batch, which learner.micro_batch_size = "
                f"{self.learner.micro_batch_size} must divide"
            )
        if self.data.source == "jsonl" and self.tools.backend == "corpus" and self.tools.corpus_path is None:
            raise ValueError(
                "data.path is set but the corpus backend has nothing to search: set tools.corpus_path to a JSONL "
                "of {url, title, text} pages"
            )
        if self.rollout.max_tokens_per_turn >= self.rollout.max_model_len:
            raise ValueError("rollout.max_tokens_per_turn must be smaller than rollout.max_model_len")
        return self

    @property
    def train_batch_size(self) -> int:
        return self.pipeline.questions_per_step * self.pipeline.samples_per_question

    @property
    def micro_batches_per_rank(self) -> int:
        """Micro-batches one rank accumulates per optimizer step."""
        per_rank = self.train_batch_size // (self.learner.num_ranks * self.learner.mini_batches)
        return max(1, per_rank // self.learner.micro_batch_size)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check the spelling; see deploy/configs/demo.yaml)")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {mask_url_passwords(repr(got))})"
            lines.append(f"  {path}: {e['msg']}{shown}")
    if len(lines) == 1:
        return "invalid config: " + lines[0].strip()
    return "invalid config:\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    return path, value


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field that is a section (possibly optional), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    return get_origin(annotation) is dict or any(get_origin(a) is dict for a in get_args(annotation))


def check_override_path(path: list[str], text: str) -> None:
    """An override may only go through sections (and into mapping fields): `a.b.c` where `a.b` is a value is wrong."""
    model: type[BaseModel] | None = RunConfig
    for depth, part in enumerate(path[:-1]):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return  # an unknown key: validation names it
        dotted = ".".join(path[: depth + 1])
        if _is_mapping(field.annotation) and depth == len(path) - 2:
            return  # e.g. rollout.resources.rollout=1
        model = _section_type(field.annotation)
        if model is None:
            raise ConfigError(
                f"override {text!r}: {dotted} is a value, not a section, so {'.'.join(path)} does not exist; "
                f"write {dotted}=VALUE"
            )


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        check_override_path(path, text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}  # an empty section in YAML ("judge:") is null
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" merges may legitimately repeat keys of the base
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise DuplicateKeyError(
                    None, None, f"key {key!r} appears twice (first on line {first}); keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_config_file(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the path of a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        byte = raw[e.start]
        raise ConfigError(f"config file {path}: line {line}: not UTF-8 (byte {byte:#04x}); save it as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f": line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file {path}{where}: not valid YAML: {problem}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = _read_config_file(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def config_from_dict(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def check_local_files(cfg: RunConfig, *, model: bool = True) -> None:
    """The files a command run here will read exist as what they should be; ConfigError names the field.

    `model=False` leaves model.path alone (`rapo eval` plays the model folder it is given).
    """
    problems = []
    if model and cfg.model.source == "path" and cfg.model.path is not None:
        path = Path(cfg.model.path).expanduser()
        if not path.exists():
            problems.append(f"model.path: {path} does not exist (model.source=path needs a Hugging Face model folder)")
        elif not (path / "config.json").is_file():
            problems.append(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    files = {"data.path": cfg.data.path, "data.eval_path": cfg.data.eval_path}
    if cfg.tools.backend == "corpus":
        files["tools.corpus_path"] = cfg.tools.corpus_path
    for field, value in files.items():
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            problems.append(f"{field}: {path} does not exist")
        elif not path.is_file():
            problems.append(f"{field}: {path} is not a file (give a JSONL file)")
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value, for MLflow params and the saved config."""
    out: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, key + "."))
        else:
            out[key] = str(value) if isinstance(value, Path) else value
    return out
