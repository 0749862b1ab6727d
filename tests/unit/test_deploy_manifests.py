"""The deploy/ folder: manifests parse, say what the cluster layout needs, and hold no secrets.

Nothing here talks to Kubernetes, Docker or Prometheus: the files are read as data and checked
against the invariants the rest of the project relies on (custom Ray resources per worker
group, /dev/shm for weight exchange, Redis durability and auth, configs that validate, dashboard
panels for every exported metric).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"

METRICS = {
    # name: kind
    "ray_rapo_episodes_total": "counter",
    "ray_rapo_generated_tokens_total": "counter",
    "ray_rapo_reward": "gauge",
    "ray_rapo_accuracy": "gauge",
    "ray_rapo_staleness": "histogram",
    "ray_rapo_queue_depth": "gauge",
    "ray_rapo_judge_latency_seconds": "histogram",
    "ray_rapo_judge_errors_total": "counter",
    "ray_rapo_weight_sync_seconds": "histogram",
    "ray_rapo_policy_version": "gauge",
    "ray_rapo_step_seconds": "histogram",
}
WORKER_GROUPS = ("rollout", "learner", "judge")
GPU_GROUPS = ("rollout", "learner")
PLACEHOLDER = "CHANGE-ME"


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text())]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def find(docs: list, kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def ray_container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    named = [c for c in containers if c["name"].startswith("ray-")]
    return named[0] if named else containers[0]


def custom_resources(start_params: dict) -> dict:
    """rayStartParams' resources: KubeRay's '"{\\"name\\": n}"' form (a quoted, escaped JSON object)."""
    raw = start_params["resources"]
    text = raw.strip()
    if text.startswith('"') and text.endswith('"'):
        text = json.loads(text)  # unquote and unescape
    return json.loads(text)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return find(load_docs(KUBERAY / "raycluster.yaml"), "RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return find(load_docs(KUBERAY / "rayjob.yaml"), "RayJob")


@pytest.fixture(scope="module")
def groups(raycluster) -> dict[str, dict]:
    return {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}


# ---------------------------------------------------------------------------------------------
# Every file parses


def test_deploy_has_the_expected_files():
    for rel in ["Dockerfile", "Dockerfile.dockerignore", "runtime_env.example.yaml", "configs/cluster-example.yaml",
                "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/redis.yaml", "kuberay/secrets.example.yaml",
                "kuberay/judge-service.yaml", "kuberay/storage.yaml", "prometheus/scrape.yaml",
                "prometheus/podmonitor.yaml", "grafana/rapo-dashboard.json", "gpu_check.sh", "gpu_check.py"]:
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"
    if path.parent.name in ("kuberay", "prometheus") and path.name != "scrape.yaml":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), (
                f"{path}: {doc.get('kind')} lacks apiVersion/kind/metadata"
            )


# ---------------------------------------------------------------------------------------------
# RayCluster layout


def test_raycluster_head(raycluster):
    spec = raycluster["spec"]
    assert raycluster["apiVersion"] == "ray.io/v1"
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["dashboard-host"] == "0.0.0.0"
    assert int(params["metrics-export-port"]) > 0
    # Dashboard reachable only inside the cluster.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    resources = ray_container(head["template"])["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {}) and "nvidia.com/gpu" not in resources.get("requests", {})


@pytest.mark.parametrize("name", WORKER_GROUPS)
def test_worker_group_has_its_custom_resource_and_bounds(groups, name):
    assert name in groups, f"worker group {name!r} missing (have {sorted(groups)})"
    g = groups[name]
    res = custom_resources(g["rayStartParams"])
    assert res.get(name, 0) > 0, f"group {name} must declare the custom Ray resource {name!r}, got {res}"
    assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert g["maxReplicas"] >= 1
    assert int(g["rayStartParams"]["metrics-export-port"]) > 0
    labels = g["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/part-of"] == "rapo-cluster"
    assert labels["app.kubernetes.io/component"] == name


def test_only_three_worker_groups(groups):
    assert sorted(groups) == sorted(WORKER_GROUPS)


@pytest.mark.parametrize("name", GPU_GROUPS)
def test_gpu_groups_request_gpus(groups, name):
    resources = ray_container(groups[name]["template"])["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert int(requests["nvidia.com/gpu"]) >= 1
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    for key in ("cpu", "memory"):
        assert key in requests and key in limits


@pytest.mark.parametrize("name", GPU_GROUPS)
def test_dev_shm_is_memory_backed(groups, name):
    spec = groups[name]["template"]["spec"]
    shm = [m for m in ray_container(groups[name]["template"])["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1, f"{name}: /dev/shm is not mounted in the Ray container"
    volume = {v["name"]: v for v in spec["volumes"]}[shm[0]["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"].get("sizeLimit"), f"{name}: a memory-backed /dev/shm needs a sizeLimit"


def test_learner_ranks_fit_one_learner_pod(groups):
    cfg = load_config(DEPLOY / "configs" / "cluster-example.yaml")
    per_pod = custom_resources(groups["learner"]["rayStartParams"])["learner"]
    gpus = int(ray_container(groups["learner"]["template"])["resources"]["limits"]["nvidia.com/gpu"])
    assert per_pod == gpus, "one learner slot per GPU"
    assert cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank <= gpus * groups["learner"]["maxReplicas"]
    rollout_gpus = int(ray_container(groups["rollout"]["template"])["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker <= rollout_gpus * groups["rollout"]["maxReplicas"]


@pytest.mark.parametrize(("section", "group"), [("rollout", "rollout"), ("learner", "learner"), ("rewards", "judge")])
def test_example_config_pins_each_actor_kind_to_its_worker_group(groups, section, group):
    """Without the custom resource an actor may land on any node (a learner rank on a rollout pod)."""
    asked = getattr(load_config(DEPLOY / "configs" / "cluster-example.yaml"), section).resources
    offered = custom_resources(groups[group]["rayStartParams"])
    assert set(asked) == {group}, f"{section}.resources should ask for exactly {{{group!r}: ...}}, got {asked}"
    assert 0 < asked[group] <= offered[group], f"one {section} actor must fit a {group} pod ({asked} vs {offered})"
    others = [g for g in groups if g != group]
    assert all(group not in custom_resources(groups[g]["rayStartParams"]) for g in others)


def test_judge_service_selects_the_judge_pods(groups):
    docs = load_docs(KUBERAY / "judge-service.yaml")
    svc = find(docs, "Service", "rapo-judge")
    labels = groups["judge"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    cfg = load_config(DEPLOY / "configs" / "cluster-example.yaml")
    assert cfg.rewards.judge.base_url == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/v1"
    target = svc["spec"]["ports"][0]["targetPort"]
    ports = [p.get("name") for c in groups["judge"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
    assert target in ports


def test_judge_key_file_is_mounted_where_the_config_reads_it(raycluster, groups):
    cfg = load_config(DEPLOY / "configs" / "cluster-example.yaml")
    key_file = cfg.rewards.judge.api_key_file
    templates = {
        "head": raycluster["spec"]["headGroupSpec"]["template"],
        **{n: g["template"] for n, g in groups.items()},
    }
    for name, template in templates.items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounted = False
        for m in ray_container(template)["volumeMounts"]:
            vol = volumes[m["name"]]
            if "secret" in vol and Path(m["mountPath"]) == key_file.parent:
                items = {i["path"] for i in vol["secret"].get("items", [])}
                mounted = key_file.name in items and vol["secret"]["secretName"] == "rapo-secrets"
        assert mounted, f"{name}: {key_file} is not mounted from the rapo-secrets Secret"


def test_head_gets_the_redis_password_from_the_secret(raycluster):
    cfg = load_config(DEPLOY / "configs" / "cluster-example.yaml")
    env = {e["name"]: e for e in ray_container(raycluster["spec"]["headGroupSpec"]["template"])["env"]}
    ref = env[cfg.redis.password_env]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "rapo-secrets" and ref["key"] == "redis-password"


def test_shared_paths_are_mounted_on_head_and_workers(raycluster, groups):
    for template in [
        raycluster["spec"]["headGroupSpec"]["template"],
        groups["rollout"]["template"],
        groups["learner"]["template"],
    ]:
        mounts = {m["mountPath"]: m for m in ray_container(template)["volumeMounts"]}
        assert mounts["/models"].get("readOnly") is True
        assert "/shared" in mounts


# ---------------------------------------------------------------------------------------------
# RayJob


def entrypoint_config(rayjob) -> tuple[list[str], Path]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    i = argv.index("rapo")
    assert argv[i + 1] == "run", f"the entrypoint must run `rapo run`, got {argv}"
    return argv, ROOT / argv[i + 2]


def test_rayjob_entrypoint_runs_a_valid_config(rayjob):
    argv, config = entrypoint_config(rayjob)
    assert config.is_file(), f"{config} does not exist in the repository"
    overrides = [a for a in argv[argv.index("run") + 2 :] if "=" in a and not a.startswith("-")]
    cfg = load_config(config, overrides)
    assert cfg.ray.address == "auto"
    assert "--output-dir" in argv and argv[argv.index("--output-dir") + 1].startswith("/shared/")


def test_rayjob_lifecycle_and_cluster(rayjob, raycluster):
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert spec["shutdownAfterJobFinishes"] is True
    # The job's cluster is the RayCluster's spec, so the two cannot drift apart.
    assert spec["rayClusterSpec"] == raycluster["spec"]


def test_rayjob_runtime_env(rayjob):
    from cluster.bootstrap import ACTOR_ENV

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["working_dir"]
    assert set(env.get("env_vars", {})).isdisjoint(ACTOR_ENV), "Ray refuses to merge env vars that ray.init also sets"
    for key in env.get("env_vars", {}):
        assert not re.search(r"PASSWORD|API_KEY|SECRET|TOKEN", key, re.I), (
            f"secret-looking env var {key} in runtimeEnvYAML"
        )


def test_runtime_env_example():
    from cluster.bootstrap import ACTOR_ENV

    env = yaml.safe_load((DEPLOY / "runtime_env.example.yaml").read_text())
    assert env["working_dir"]
    assert set(env) <= {"working_dir", "excludes", "pip", "env_vars", "py_modules", "image_uri", "config"}
    assert set(env.get("env_vars", {})).isdisjoint(ACTOR_ENV)
    for key in env.get("env_vars", {}):
        assert not re.search(r"PASSWORD|API_KEY|SECRET|TOKEN", key, re.I)


# ---------------------------------------------------------------------------------------------
# Redis


@pytest.fixture(scope="module")
def redis_docs() -> list:
    return load_docs(KUBERAY / "redis.yaml")


def redis_conf(redis_docs) -> str:
    cm = find(redis_docs, "ConfigMap")
    return cm["data"]["redis.conf"]


def test_redis_durability(redis_docs):
    conf = redis_conf(redis_docs)
    lines = {
        tuple(line.split(None, 1)) for line in conf.splitlines() if line.strip() and not line.lstrip().startswith("#")
    }
    assert ("appendonly", "yes") in lines
    assert ("appendfsync", "everysec") in lines
    assert ("protected-mode", "yes") in lines
    assert ("maxmemory-policy", "noeviction") in lines
    assert not any(k == "requirepass" for k, *_ in lines), "the password must not live in the ConfigMap"
    dep = find(redis_docs, "Deployment", "rapo-redis")
    pod = dep["spec"]["template"]["spec"]
    claim = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    pvc = find(redis_docs, "PersistentVolumeClaim")
    assert claim[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "dir /data" in conf


def test_redis_password_comes_from_the_secret(redis_docs):
    dep = find(redis_docs, "Deployment", "rapo-redis")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = c.get("args", [])
    assert "--requirepass" in args
    value = args[args.index("--requirepass") + 1]
    assert value == "$(REDIS_PASSWORD)", f"requirepass must be the env var, got {value!r}"
    env = {e["name"]: e for e in c["env"]}
    assert "value" not in env["REDIS_PASSWORD"]
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rapo-secrets", "key": "redis-password"}
    # Bound to the pod IP (downward API), not 0.0.0.0.
    assert args[args.index("--bind") + 1] == "$(POD_IP)"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert c["resources"]["limits"]["memory"] and c["resources"]["limits"]["cpu"]


def test_redis_readiness_probe_uses_the_env_var(redis_docs):
    c = find(redis_docs, "Deployment", "rapo-redis")["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(c["readinessProbe"]["exec"]["command"])
    assert "redis-cli" in command and "ping" in command
    assert "$REDIS_PASSWORD" in command, "the probe authenticates through the env var, expanded at probe time"


def test_redis_network_policy_admits_only_ray_pods(redis_docs, raycluster):
    np_ = find(redis_docs, "NetworkPolicy")
    dep = find(redis_docs, "Deployment", "rapo-redis")
    assert np_["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = np_["spec"]["ingress"]
    (source,) = rule["from"]
    allowed = source["podSelector"]["matchLabels"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    templates = [raycluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in raycluster["spec"]["workerGroupSpecs"]
    ]
    for t in templates:
        assert allowed.items() <= t["metadata"]["labels"].items(), "every Ray pod must be admitted"
    assert not allowed.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    svc = find(redis_docs, "Service", "rapo-redis")
    cfg = load_config(DEPLOY / "configs" / "cluster-example.yaml")
    assert cfg.redis.url.startswith(f"redis://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/")


# ---------------------------------------------------------------------------------------------
# Secrets


SECRET_PATTERNS = [
    (re.compile(r"sk-[A-Za-z0-9_-]{16,}"), "OpenAI-style API key"),
    (re.compile(r"hf_[A-Za-z0-9]{20,}"), "Hugging Face token"),
    (re.compile(r"AKIA[0-9A-Z]{16}"), "AWS access key"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "private key"),
    (re.compile(r"redis://[^/\s]*:[^@/\s]+@"), "password inside a Redis URL"),
    (re.compile(r"^\s*requirepass\s+\S", re.M), "literal requirepass"),
    (
        re.compile(r"(--requirepass|--api-key|-a)[ =]+(?!\$\(|\"?\$)[\"']?[A-Za-z0-9+/=_-]{6,}"),
        "literal password argument",
    ),
    (
        re.compile(
            r"(?i)\b(password|passwd|api[_-]?key|secret|token)\b\s*[:=]\s*[\"']?(?!CHANGE-ME)(?![\"']?\$)[A-Za-z0-9+/=_-]{12,}"
        ),
        "literal credential",
    ),
]


def text_files() -> list[Path]:
    return sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".sh", ".py", "", ".dockerignore", ".txt", ".conf")
    )


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_literal_secrets(path):
    text = path.read_text()
    for pattern, what in SECRET_PATTERNS:
        m = pattern.search(text)
        assert m is None, f"{path.relative_to(ROOT)}: {what}: {m.group(0)!r}"


def test_secret_template_holds_placeholders_only():
    secret = find(load_docs(KUBERAY / "secrets.example.yaml"), "Secret", "rapo-secrets")
    assert "data" not in secret, "base64 `data` would hide what is committed; use stringData placeholders"
    assert set(secret["stringData"]) == {"redis-password", "judge-api-key"}
    for key, value in secret["stringData"].items():
        assert value == PLACEHOLDER, f"{key} must stay the {PLACEHOLDER} placeholder in the repository"
    assert "never commit" in (KUBERAY / "secrets.example.yaml").read_text().lower()


def all_env_vars():
    for path in yaml_files():
        for doc in load_docs(path):
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if (
                        "name" in node
                        and ("value" in node or "valueFrom" in node)
                        and isinstance(node.get("name"), str)
                    ):
                        yield path, node
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)


def test_secret_env_vars_come_from_secret_refs():
    seen = 0
    for path, env in all_env_vars():
        if re.search(r"PASSWORD|API_KEY|SECRET|TOKEN", env["name"]):
            seen += 1
            assert "value" not in env, f"{path.name}: {env['name']} is a literal"
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "rapo-secrets"
    assert seen >= 3


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("path", sorted((DEPLOY / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates(path):
    load_config(path)


def test_cluster_example_config():
    cfg = load_config(DEPLOY / "configs" / "cluster-example.yaml")
    assert cfg.model.source == "path" and str(cfg.model.path) == "/models/Qwen3-4B"
    assert cfg.rollout.num_workers == 4 and cfg.rollout.num_gpus_per_worker == 1 and cfg.rollout.dtype == "bfloat16"
    assert cfg.learner.num_ranks == 4 and cfg.learner.num_gpus_per_rank == 1
    assert cfg.learner.zero_stage == 3 and cfg.learner.dtype == "bfloat16"
    assert cfg.rewards.stage == 2
    judge = cfg.rewards.judge
    assert judge.base_url == "http://rapo-judge:8000/v1" and judge.model == "judge"
    assert str(judge.api_key_file) == "/var/run/secrets/rapo/judge-api-key"
    assert cfg.redis.url == "redis://rapo-redis:6379/0" and cfg.redis.password_env == "RAPO_REDIS_PASSWORD"
    assert cfg.ray.address == "auto"
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert (cfg.pipeline.questions_per_step, cfg.pipeline.samples_per_question, cfg.rollout.max_tool_calls) == (
        32,
        5,
        32,
    )


# ---------------------------------------------------------------------------------------------
# Monitoring


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "rapo-dashboard.json").read_text())


def dashboard_exprs(dashboard) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_shape(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    assert ds and ds[0]["query"] == "prometheus"
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == f"${{{ds[0]['name']}}}"


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_dashboard_charts_every_metric(dashboard, metric):
    kind = METRICS[metric]
    exprs = [e for e in dashboard_exprs(dashboard) if re.search(rf"\b{metric}(_bucket|_sum|_count)?\b", e)]
    assert exprs, f"no panel queries {metric}"
    if kind == "counter":
        assert any(re.search(rf"(rate|increase)\(\s*{metric}\b", e) for e in exprs), (
            f"{metric}: counters are charted as rates"
        )
    elif kind == "histogram":
        assert any(re.search(rf"histogram_quantile\([^,]+,.*{metric}_bucket", e) for e in exprs), f"{metric}: quantiles"
        assert all(f"{metric}_bucket" in e or f"{metric}_sum" in e or f"{metric}_count" in e for e in exprs)


def test_dashboard_uses_the_tags(dashboard):
    exprs = " ".join(dashboard_exprs(dashboard))
    for tag in ("split", "queue", "reason", "phase"):
        assert f"by ({tag})" in exprs or f", {tag})" in exprs, tag


def test_prometheus_scrape_config():
    (conf,) = load_docs(DEPLOY / "prometheus" / "scrape.yaml")
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files


def test_prometheus_operator_monitors(raycluster):
    docs = load_docs(DEPLOY / "prometheus" / "podmonitor.yaml")
    kinds = {d["kind"] for d in docs}
    assert {"PodMonitor", "ServiceMonitor"} <= kinds
    pod_monitor = find(docs, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # The port the monitors scrape is the metrics-export-port, under that name, in every Ray pod.
    head = raycluster["spec"]["headGroupSpec"]
    templates = [head] + raycluster["spec"]["workerGroupSpecs"]
    for t in templates:
        port = int(t["rayStartParams"]["metrics-export-port"])
        named = {p["name"]: p["containerPort"] for p in ray_container(t["template"]).get("ports", [])}
        assert named.get("metrics") == port


# ---------------------------------------------------------------------------------------------
# Image


def test_dockerfile(raycluster):
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    assert args["RAY_VERSION"] == raycluster["spec"]["rayVersion"], "image Ray must match the cluster's rayVersion"
    assert any(re.match(r"FROM rayproject/ray:\$\{RAY_VERSION\}", line) for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert any(line.startswith("WORKDIR ") for line in lines)
    assert "[gpu]" in text and "deepspeed" in text.lower()
    assert not any(line.startswith("HEALTHCHECK") for line in lines)
    # The build context is the repo root: the Dockerfile-specific ignore file keeps local state out.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore and "runs" in ignore


def test_images_are_the_same_everywhere(raycluster):
    images = {
        c["image"]
        for t in [raycluster["spec"]["headGroupSpec"]] + raycluster["spec"]["workerGroupSpecs"]
        for c in t["template"]["spec"]["containers"]
    }
    assert len(images) == 1


# ---------------------------------------------------------------------------------------------
# GPU check script (pure parts; the run itself is below, marked slow)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", DEPLOY / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_peak_flops_table(gpu_check):
    assert gpu_check.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops_for("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops_for("Some Future GPU") is None


def test_gpu_check_model_is_qwen3_0_6b(gpu_check):
    a = gpu_check.QWEN3_0_6B
    assert (
        a["hidden_size"],
        a["num_hidden_layers"],
        a["num_attention_heads"],
        a["num_key_value_heads"],
        a["head_dim"],
        a["intermediate_size"],
        a["vocab_size"],
        a["tie_word_embeddings"],
        a["rope_theta"],
    ) == (1024, 28, 16, 8, 128, 3072, 151936, True, 1e6)


def test_gpu_check_qwen3_4b_shape_and_matrix_table(gpu_check):
    a = gpu_check.QWEN3_4B
    assert (
        a["hidden_size"],
        a["num_hidden_layers"],
        a["num_attention_heads"],
        a["num_key_value_heads"],
        a["intermediate_size"],
        a["vocab_size"],
    ) == (2560, 36, 32, 8, 9728, 151936)
    ok = {
        "shape": "qwen3-4b",
        "zero_stage": 3,
        "gradient_checkpointing": True,
        "packing": True,
        "attention": "sdpa",
        "tokens_per_s_per_gpu": 12345.6,
        "step_s_median": 1.5,
        "mfu": 0.321,
        "peak_mem_allocated_gib": 40.04,
    }
    bad = {"shape": "qwen3-4b", "zero_stage": 2, "gradient_checkpointing": False, "error": "failed (exit 1)"}
    rows = gpu_check.mfu_table([ok, bad]).splitlines()
    assert rows[2] == "| qwen3-4b | 3 | on | packed | sdpa | 12,346 | 1.500 | 32.1 % | 40.0 |"
    assert "failed (exit 1)" in rows[3] and len(rows) == 4


def test_gpu_check_long_tailed_lengths(gpu_check):
    samples = gpu_check.make_samples(64, 2048, 1000, seed=1, lengths="longtail")
    lengths = [len(s.token_ids) for s in samples]
    assert all(16 <= n <= 2048 for n in lengths)
    assert max(lengths) > 3 * sorted(lengths)[32]  # most are short, a few long: what packing saves on
    for s in samples:
        assert len(s.loss_mask) == len(s.behaviour_logprobs) == len(s.token_ids) and s.loss_mask[-1] == 1
    assert all(len(s.token_ids) == 256 for s in gpu_check.make_samples(4, 256, 1000, seed=1))


def test_gpu_check_loss_mask_and_flops(gpu_check):
    import numpy as np

    from learner.batch import TrainSample

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = gpu_check.episode_mask(2048, rng)
        assert len(mask) == 2048 and mask[0] == 0 and mask[-1] == 1
        assert 0.15 < sum(mask) / len(mask) < 0.6  # prompt and tool responses are masked out
    arch = dict(hidden_size=4, num_hidden_layers=2, num_attention_heads=2, head_dim=3, vocab_size=10)
    s = TrainSample(token_ids=[1] * 5, loss_mask=[0, 1, 1, 0, 1], behaviour_logprobs=None, advantage=1.0)
    f = gpu_check.step_flops([s], arch, n_non_embedding=100)
    # 6*N*T + 12*L*H*Q*S^2 + 6*V*d*T_loss with T = 5, S = 5, T_loss = 3 (the first token is never predicted)
    assert f["flops"] == 6 * 100 * 5 + 12 * 2 * 2 * 3 * 25 + 6 * 10 * 4 * 3
    assert f["flops_lm_head_all_tokens"] == 6 * (100 + 40) * 5 + 12 * 2 * 2 * 3 * 25


def test_gpu_check_wrapper_is_strict():
    text = (DEPLOY / "gpu_check.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "nvidia-smi" in text and "--cpu" in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_cpu_plumbing(tmp_path):
    """The whole check on CPU: random tiny Qwen3, Trainer, ZeRO-3 over gloo, two timed steps, packed
    token-budget micro-batches of long-tailed sequences (the path the GPU run measures)."""
    out = tmp_path / "result.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHON"] = sys.executable
    cmd = [
        "bash",
        str(DEPLOY / "gpu_check.sh"),
        "--cpu",
        "--lengths",
        "longtail",
        "--max-tokens",
        "64",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "gloo" and result["zero_stage"] == 3
    assert result["packing"] and result["attention"] == "sdpa" and result["pad_fraction"] == 0.0
    assert result["micro_batches_per_rank"] >= 2 and result["max_tokens"] == 64
    assert result["tokens_per_s"] > 0 and result["step_s_median"] > 0
    assert "GPU_CHECK_RESULT" in proc.stdout
