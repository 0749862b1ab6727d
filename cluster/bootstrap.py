"""Start (or join) what a run needs: Ray and Redis. Whatever this process started, it stops.

Which Ray (`ray_target`): `ray.address` in the config, else the `RAY_ADDRESS` environment
variable (Ray Jobs sets it for a job's entrypoint, so a submitted `rapo run` joins the cluster
it was submitted to), else a private local Ray. A running local cluster is never joined
implicitly (unlike `ray.init()` with no address): tests and other runs start private Rays on
the same machine at the same time, and discovering "the" local cluster would make them join
each other's. `ray.address=auto` asks for that discovery explicitly.

With no address a local Ray starts with its dashboard on loopback and its Prometheus
metrics (Ray's and rapo's custom ray_rapo_* ones, cluster/ray_metrics.py) on a free port; with
no `redis.url` a private Redis server starts on loopback with a random password and AOF under
the run folder. Both are torn down on normal exit, on error and on Ctrl-C / SIGTERM.

Ray's metrics agent binds its endpoint to 127.0.0.1 only on a node whose IP is loopback, and
Ray never gives a node a loopback IP on Linux (that would break every `ray.init(address="auto")`
from another process, `rapo scale` and `rapo status` included): so on a local cluster the
endpoint listens on all interfaces, like Ray's own GCS and raylet ports. It serves read-only
metrics; the dashboard (which can run jobs) stays on `ray.dashboard_host`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.config import RunConfig
from cluster.ray_metrics import endpoints
from cluster.redis_server import RedisServer, start_redis

ACTOR_ENV = {
    # Models load from local paths only; never reach for a hub.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "1",
    # libgomp's idle threads spin about 300k times before they sleep. Where two OpenMP processes share
    # the cores (vLLM decoding while the learner trains, on one machine), each then spins on the
    # cores the other needs: two small-op torch processes at once ran 5x slower than one, instead of
    # 2x (bench/omp_spin.py). 300 spins keeps a lone process's speed.
    "GOMP_SPINCOUNT": "300",
}


@dataclass
class Services:
    redis_url: str
    redis_password: str | None
    dashboard_url: str | None
    node_id: str
    redis_server: RedisServer | None = None
    ray_started: bool = False
    # Prometheus text of this node's metrics (Ray's and rapo's ray_rapo_*), e.g. http://10.0.0.5:PORT/metrics.
    metrics_url: str | None = None


def resolve_redis_password(cfg: RunConfig) -> str | None:
    return os.environ.get(cfg.redis.password_env)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# Logical CPUs a local cluster keeps free so that `rapo scale` can add rollout workers.
SCALE_HEADROOM_WORKERS = 4


def needed_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for a local cluster: what the actors ask for, plus room to scale rollout out.

    Ray's CPUs are bookkeeping, not pinning; vLLM and the learner size their own threads.
    """
    need = (
        (cfg.rollout.num_workers + SCALE_HEADROOM_WORKERS) * cfg.rollout.num_cpus_per_worker
        + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank
        + cfg.rewards.num_actors * cfg.rewards.num_cpus_per_actor
    )
    return max(int(need + 0.999), os.cpu_count() or 1)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _job_env_keys() -> set[str]:
    """Env var names of the runtime_env of the Ray job this driver runs in (none outside a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def ray_target(cfg: RunConfig, environ=os.environ) -> tuple[str | None, str]:
    """The cluster to join (None: start a private local Ray) and where that choice came from."""
    if cfg.ray.address:
        return cfg.ray.address, "ray.address"
    if environ.get("RAY_ADDRESS"):
        return environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return None, "no ray.address nor RAY_ADDRESS"


# Ray gives a new local node a fixed 30 s to register with its GCS (`raylet_start_wait_time_s` in
# ray/_private/node.py, not a setting). On a machine whose cores are all busy, a healthy raylet can
# miss it, and ray.init raises with this text.
NODE_START_TIMEOUT = "timed out during startup"


def _descendants() -> dict[int, float]:
    """{pid: start time} of this process's descendants (a pid alone could have been reused)."""
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out[child.pid] = child.create_time()
    return out


def stop_new_descendants(before: dict[int, float], grace_s: float = 3.0) -> list[int]:
    """Stop, by pid, the descendants of this process that were not in `before`; returns their pids."""
    import psutil

    new = []
    for pid, started in _descendants().items():
        if before.get(pid) != started:
            with contextlib.suppress(psutil.Error):
                new.append(psutil.Process(pid))
    for proc in new:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(new, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in new]


def start_local_ray(attempts: int = 3, log=print, init: Callable | None = None, **kwargs):
    """`ray.init(address="local", **kwargs)`, tried again when the new node misses Ray's start-up limit.

    A failed start leaves its GCS and raylet running (ray.init keeps no handle to them): they are
    stopped before the next try, so that a retry does not leave two half-started Rays behind.
    """
    import ray

    init = init or ray.init
    for attempt in range(1, attempts + 1):
        before = _descendants()
        try:
            return init(address="local", **kwargs)
        except Exception as e:
            if NODE_START_TIMEOUT not in str(e) or attempt == attempts:
                raise
            stopped = stop_new_descendants(before)
            log(f"ray: the local node missed Ray's 30 s start-up limit (a busy machine?); stopped the "
                f"{len(stopped)} processes it started, trying again ({attempt + 1} of {attempts})")
            time.sleep(1.0)
    raise AssertionError("unreachable")


def init_ray(cfg: RunConfig, log_to_driver: bool = False, log=print) -> tuple[bool, str | None]:
    """Join the cluster `ray_target` names, or start a private local Ray.

    Returns (whether this process started Ray, the dashboard URL).
    """
    import ray

    # Variables a submitted job already sets stay its own: Ray refuses to merge two values of one key.
    taken = _job_env_keys()
    # The CLI sets these defaults in its own environment (where a user's value wins); actors get the same.
    env = {"env_vars": {k: os.environ.get(k, v) for k, v in ACTOR_ENV.items() if k not in taken}}
    address, why = ray_target(cfg)
    if address:
        info = ray.init(address=address, namespace=cfg.ray.namespace, runtime_env=env, log_to_driver=log_to_driver)
        log(f"ray: joined the cluster at {address} (from {why}), node {ray.get_runtime_context().get_node_id()[:12]}")
        return False, info.dashboard_url
    from cluster.redis_server import free_port

    port = cfg.ray.dashboard_port
    if port and not _port_free(port):
        port = free_port()
    info = start_local_ray(
        log=log,
        num_cpus=cfg.ray.num_cpus or needed_cpus(cfg),
        include_dashboard=True,
        dashboard_host=cfg.ray.dashboard_host,
        dashboard_port=port,
        namespace=cfg.ray.namespace,
        runtime_env=env,
        log_to_driver=log_to_driver,
        # Ray's metrics agent binds it on every interface: free there, not only on loopback.
        _metrics_export_port=free_port(""),
    )
    log(f"ray: started a private local Ray ({why}), node {ray.get_runtime_context().get_node_id()[:12]}")
    return True, info.dashboard_url


@contextmanager
def services(cfg: RunConfig, output_dir: Path, log=print, log_to_driver: bool = False):
    import ray

    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    server = None
    ray_started = False
    try:
        if cfg.redis.url:
            url, password = cfg.redis.url, resolve_redis_password(cfg)
        else:
            server = start_redis(output_dir / "redis", executable=cfg.redis.executable)
            url, password = server.url, server.password
            log(f"redis: {url} (pid {server.process.pid}, AOF in {server.data_dir})")
        ray_started, dashboard = init_ray(cfg, log_to_driver, log)
        # ray.init installs its own SIGTERM handler, which exits without our clean-up: take it back.
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        node_id = ray.get_runtime_context().get_node_id()
        yield Services(url, password, f"http://{dashboard}" if dashboard else None, node_id, server, ray_started,
                       endpoints()["metrics_url"])
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if server is not None:
                server.stop()
            signal.signal(signal.SIGTERM, previous)


def weights_dir_for(run_id: str, output_dir: Path) -> Path:
    """Node-local shared memory when there is room (weights are re-read every step), else the run folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30:
        return shm / f"rapo-{run_id}"
    return output_dir / "weights"
