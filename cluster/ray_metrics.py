"""rapo's custom metrics for the Ray dashboard and Prometheus (ray.util.metrics).

Ray exports what any process of the cluster records through ray.util.metrics on its node's
metrics endpoint (the metrics-export-port, path /metrics) with a ``ray_`` prefix:
``rapo_episodes_total`` is scraped as ``ray_rapo_episodes_total``, a histogram as
``ray_rapo_staleness_bucket`` / ``_sum`` / ``_count``. deploy/prometheus/ scrapes them and
deploy/grafana/rapo-dashboard.json charts them. Ray adds its own labels (SessionName,
NodeAddress, WorkerId, ...) and exports a batch about every 10 s.

Who records what:

- the controller, after every trainer step (:func:`record_step`) and every evaluation
  (:func:`record_eval`);
- every reward labeller actor (``judge-N``), per scored trajectory (:func:`record_judge`):
  the time it took to judge, and the judge's failed calls by reason;
- the reward pool (in the controller): reward actors lost mid-chunk (reason ``actor_failure``).

The mapping from the controller's per-step metrics dict to records is pure
(:func:`step_records`, :func:`eval_records`, :func:`judge_records`); :func:`emit` is the only
part that touches Ray, and it never raises: a metrics failure must not stop a run.
Ray's metrics agent drops a gauge series that was not set within two report intervals, so the
gauges recorded here are set again in the background (:class:`GaugeKeeper`) as long as the
process lives. This module imports nothing from the rest of the project, so actors may import it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# Bucket upper bounds (Ray wants them positive and increasing). Lags are whole policy versions:
# le="0.5" holds the on-policy groups, le="1" those at most one version behind, and so on.
STALENESS_BUCKETS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
# Step phases and weight syncs: tens of milliseconds (a tiny model on GPUs) to tens of minutes
# (a 4B model's step on CPUs).
SECONDS_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
)
# Judging one trajectory: microseconds (the rule judge) to minutes (an LLM judge with retries).
JUDGE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = field(default=())


SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec("rapo_episodes_total", COUNTER, "Episodes trained on (a step's groups x samples per question)."),
        MetricSpec(
            "rapo_generated_tokens_total",
            COUNTER,
            "Tokens the policy generated in the episodes trained on (tool responses and prompts excluded).",
        ),
        MetricSpec("rapo_reward", GAUGE, "Mean reward of the episodes of the last training step."),
        MetricSpec(
            "rapo_accuracy",
            GAUGE,
            "Judged-correct fraction: the last step's episodes (split=train) or the last "
            "held-out evaluation (split=eval).",
            ("split",),
        ),
        MetricSpec(
            "rapo_staleness",
            HISTOGRAM,
            "Policy versions between a trained group's start and the version it was trained at (0 = on-policy).",
            boundaries=STALENESS_BUCKETS,
        ),
        MetricSpec(
            "rapo_queue_depth",
            GAUGE,
            "Groups waiting: scored and queued for the learner (queue=groups) or "
            "in generation and scoring (queue=running).",
            ("queue",),
        ),
        MetricSpec(
            "rapo_judge_latency_seconds",
            HISTOGRAM,
            "Time to judge one trajectory (answer and step labels, retries included), per reward actor.",
            boundaries=JUDGE_BUCKETS,
        ),
        MetricSpec(
            "rapo_judge_errors_total",
            COUNTER,
            "Failed judge calls by reason (http_429, http_5xx, http_4xx, "
            "timeout, connection, invalid_reply, wrong_label_count) and reward actors lost (actor_failure).",
            ("reason",),
        ),
        MetricSpec(
            "rapo_weight_sync_seconds",
            HISTOGRAM,
            "Publishing new weights and loading them into every rollout worker.",
            boundaries=SECONDS_BUCKETS,
        ),
        MetricSpec("rapo_policy_version", GAUGE, "Latest policy version published to the rollout workers."),
        MetricSpec(
            "rapo_step_seconds",
            HISTOGRAM,
            "Time per phase of a training step (wait, train, weight_sync, step; "
            "generate and reward are per-group means; eval per evaluation).",
            ("phase",),
            SECONDS_BUCKETS,
        ),
    )
}


class Record(NamedTuple):
    """One observation: a counter increment, a gauge value or a histogram sample."""

    name: str
    value: float
    tags: dict[str, str]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _add(out: list[Record], name: str, value: Any, **tags: str) -> None:
    v = _number(value)
    if v is None:
        return
    if SPECS[name].kind == COUNTER and v <= 0:
        return  # counters only go up; a zero increment is no observation
    out.append(Record(name, v, dict(tags)))


def _phases(metrics: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """("train", 3.2) for every "time/train_s" in the dict."""
    for key, value in metrics.items():
        if key.startswith("time/") and key.endswith("_s") and len(key) > len("time/_s"):
            yield key[len("time/") : -len("_s")], value


def step_records(metrics: Mapping[str, Any], *, episodes: int, lags: Iterable[int] = ()) -> list[Record]:
    """Records of one trainer step.

    ``metrics`` is the dict the controller logs per step ("reward/mean", "train/accuracy",
    "train/response_tokens" (a mean per episode), "time/*_s", "policy_version",
    "queue/groups_depth", "pipeline/running_groups"); ``episodes`` the number of episodes it
    trained on and ``lags`` the staleness (versions) of each trained group.
    """
    out: list[Record] = []
    _add(out, "rapo_episodes_total", episodes)
    tokens = _number(metrics.get("train/response_tokens"))
    if tokens is not None and episodes > 0:
        _add(out, "rapo_generated_tokens_total", round(tokens * episodes))
    _add(out, "rapo_reward", metrics.get("reward/mean"))
    _add(out, "rapo_accuracy", metrics.get("train/accuracy"), split="train")
    _add(out, "rapo_policy_version", metrics.get("policy_version"))
    for lag in lags:
        _add(out, "rapo_staleness", lag)
    for key, value in metrics.items():
        if key.startswith("queue/") and key.endswith("_depth") and len(key) > len("queue/_depth"):
            _add(out, "rapo_queue_depth", value, queue=key[len("queue/") : -len("_depth")])
    if "pipeline/running_groups" in metrics:
        _add(out, "rapo_queue_depth", metrics["pipeline/running_groups"], queue="running")
    _add(out, "rapo_weight_sync_seconds", metrics.get("time/weight_sync_s"))
    for phase, value in _phases(metrics):
        _add(out, "rapo_step_seconds", value, phase=phase)
    return out


def eval_records(metrics: Mapping[str, Any]) -> list[Record]:
    """Records of one held-out evaluation ("eval/accuracy", "time/eval_s")."""
    out: list[Record] = []
    _add(out, "rapo_accuracy", metrics.get("eval/accuracy"), split="eval")
    for phase, value in _phases(metrics):
        _add(out, "rapo_step_seconds", value, phase=phase)
    return out


def judge_records(latencies_s: Iterable[float] = (), errors: Mapping[str, int] | None = None) -> list[Record]:
    """Records of scored trajectories (judge time each) and judge errors (count by reason)."""
    out: list[Record] = []
    for latency in latencies_s:
        _add(out, "rapo_judge_latency_seconds", latency)
    for reason, n in sorted((errors or {}).items()):
        _add(out, "rapo_judge_errors_total", n, reason=str(reason))
    return out


def new_counts(now: Mapping[str, int], seen: dict[str, int]) -> dict[str, int]:
    """What ``now`` (cumulative counts) gained since ``seen``, which is brought up to date."""
    gained = {k: v - seen.get(k, 0) for k, v in now.items() if v > seen.get(k, 0)}
    seen.update(now)
    return gained


# ---- Ray side ----------------------------------------------------------------------------------

_registry: dict[str, Any] | None = None
_warned = False


def _warn_once(e: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("recording Ray metrics failed (%s: %s); later failures are not logged", type(e).__name__, e)


def _report_interval_s() -> float:
    """How often this process' metrics go to the agent (RAY_metrics_report_interval_ms, at least 1 s)."""
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:  # noqa: BLE001
        return 10.0


class GaugeKeeper:
    """The last value of every gauge series of this process, set again every ``period_s``.

    Ray 2.60's metrics agent evicts a gauge series not refreshed within two report intervals:
    an eval accuracy set once would vanish from the endpoint (and the dashboard) seconds later.
    """

    def __init__(self, period_s: float | None = None):
        self.period_s = period_s
        self.lock = threading.Lock()
        self.last: dict[tuple, tuple[Any, float, dict[str, str]]] = {}
        self.thread: threading.Thread | None = None

    def remember(self, name: str, metric: Any, value: float, tags: dict[str, str]) -> None:
        with self.lock:
            self.last[(name, tuple(sorted(tags.items())))] = (metric, value, tags)

    def refresh(self) -> None:
        with self.lock:
            series = list(self.last.values())
        for metric, value, tags in series:
            metric.set(value, tags=tags)

    def start(self) -> None:
        """Refresh in a daemon thread, at half the report interval (started once)."""
        with self.lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self._loop, name="rapo-gauge-keeper", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        period = self.period_s or _report_interval_s() / 2
        while True:
            time.sleep(period)
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001
                _warn_once(e)


_keeper = GaugeKeeper()


def _make(spec: MetricSpec):
    from ray.util import metrics

    if spec.kind == COUNTER:
        return metrics.Counter(spec.name, spec.description, spec.tag_keys)
    if spec.kind == GAUGE:
        return metrics.Gauge(spec.name, spec.description, spec.tag_keys)
    return metrics.Histogram(spec.name, spec.description, list(spec.boundaries), spec.tag_keys)


def registry() -> dict[str, Any]:
    """The Ray metric objects of this process, made once, on first use."""
    global _registry
    if _registry is None:
        _registry = {name: _make(spec) for name, spec in SPECS.items()}
    return _registry


def emit(
    records: Iterable[Record], metrics: Mapping[str, Any] | None = None, keeper: GaugeKeeper | None = None
) -> None:
    """Record ``records`` on Ray's metrics, gauges kept fresh by this process' keeper (or on
    ``metrics``, name -> object, and ``keeper``, for tests). Never raises."""
    try:
        if metrics is None:
            metrics, keeper = registry(), _keeper
        for r in records:
            metric = metrics[r.name]
            kind = SPECS[r.name].kind
            if kind == COUNTER:
                metric.inc(r.value, tags=r.tags)
            elif kind == GAUGE:
                metric.set(r.value, tags=r.tags)
                if keeper is not None:
                    keeper.remember(r.name, metric, r.value, r.tags)
                    keeper.start()
            else:
                metric.observe(r.value, tags=r.tags)
    except Exception as e:  # noqa: BLE001 - dashboards are not worth a failed run
        _warn_once(e)


def record_step(metrics: Mapping[str, Any], *, episodes: int, lags: Iterable[int] = ()) -> None:
    emit(step_records(metrics, episodes=episodes, lags=lags))


def record_eval(metrics: Mapping[str, Any]) -> None:
    emit(eval_records(metrics))


def record_judge(latencies_s: Iterable[float] = (), errors: Mapping[str, int] | None = None) -> None:
    emit(judge_records(latencies_s, errors))


_endpoints: dict[str, str | None] | None = None


def endpoints() -> dict[str, str | None]:
    """The Ray dashboard's URL and the metrics URL of this process' node (inside a connected Ray
    process; None where unknown). For status.json: where to look while a run goes on. Looked up
    once per process (Ray's GCS), then remembered."""
    global _endpoints
    if _endpoints is not None:
        return dict(_endpoints)
    out: dict[str, str | None] = {"dashboard_url": None, "metrics_url": None}
    try:
        import ray
        from ray._private.services import get_webui_url_from_internal_kv

        url = get_webui_url_from_internal_kv()
        if url:
            out["dashboard_url"] = url if "://" in url else f"http://{url}"
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and int(node.get("MetricsExportPort") or 0) > 0:
                host = node["NodeManagerAddress"]
                host = f"[{host}]" if ":" in host else host
                out["metrics_url"] = f"http://{host}:{node['MetricsExportPort']}/metrics"
    except Exception as e:  # noqa: BLE001
        log.debug("cannot find the dashboard and metrics URLs: %s", e)
        return out
    _endpoints = out
    return dict(out)
