"""`rapo status` as tables an operator reads at a glance (`--json` keeps the raw dicts for scripts).

Pure functions from the status dicts (the controller's status() + actors(), or a Ray job's info) to
rich renderables; the CLI only prints them.
"""

from __future__ import annotations

import io
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table

MISSING = "-"


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return MISSING
    return fmt.format(value) if isinstance(value, float) else str(value)


def _short_node(node_id: Any) -> str:
    """Ray node ids are 56 hex digits; the first 8 tell a cluster's nodes apart."""
    return str(node_id)[:8] if node_id else MISSING


def _rollout_state(worker: dict) -> str:
    if worker.get("draining"):
        return "draining"
    return "ready" if worker.get("ready") else "starting"


def actor_rows(actors: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(role, name, state, pid, node, detail) for every actor of the run, in a stable order."""
    rows = []
    if controller := actors.get("controller"):
        rows.append(("controller", controller.get("name", "controller"), "alive", _num(controller.get("pid")),
                     _short_node(controller.get("node_id")), ""))
    for w in actors.get("rollout") or []:
        detail = f"in flight {w.get('in_flight', 0)}, restarts {w.get('restarts', 0)}"
        if w.get("engine"):
            detail = f"{w['engine']}, {detail}"
        rows.append(("rollout", w["name"], _rollout_state(w), _num(w.get("pid")), _short_node(w.get("node_id")),
                     detail))
    for r in actors.get("learner") or []:
        rows.append(("learner", f"learner-{r.get('rank', '?')}", "alive", _num(r.get("pid")),
                     _short_node(r.get("node_id")), "gpu" if r.get("gpu") else "cpu"))
    for j in actors.get("judge") or []:
        if "error" in j:
            rows.append(("judge", j.get("name", "?"), f"unreachable ({j['error']})", MISSING, MISSING, ""))
        else:
            rows.append(("judge", j["name"], "alive", _num(j.get("pid")), _short_node(j.get("node_id")),
                         f"scored {j.get('scored', 0)}"))
    return rows


def run_status_view(status: dict) -> RenderableType:
    """The live run: progress, versions and URLs, then one row per actor (``status["actors"]``)."""
    run = Table(title="run", show_header=False, title_justify="left")
    run.add_column("field", style="bold")
    run.add_column("value")
    steps = status.get("steps")
    fields = [
        ("phase", _num(status.get("phase"))),
        ("step", f"{_num(status.get('step'))}/{_num(steps)}" if steps else _num(status.get("step"))),
        ("policy version", _num(status.get("version"))),
        ("mode", _num(status.get("mode"))),
        ("episodes trained", _num(status.get("episodes"))),
        ("reward (last step)", _num(status.get("reward"))),
        ("train accuracy", _num(status.get("train_accuracy"))),
        ("eval accuracy", _num(status.get("eval_accuracy"))),
        ("step time", _num(status.get("step_time_s"), "{:.1f} s")),
        ("rollout workers", _num(status.get("rollout_workers"))),
        ("running groups", _num(status.get("running_groups"))),
        ("dashboard", _num(status.get("dashboard_url"))),
        ("metrics", _num(status.get("metrics_url"))),
    ]
    for name, value in fields:
        run.add_row(name, value)

    actors = Table(title="actors", title_justify="left")
    for column in ("role", "name", "state", "pid", "node", "detail"):
        actors.add_column(column, no_wrap=column != "detail")
    for row in actor_rows(status.get("actors") or {}):
        actors.add_row(*row)
    return Group(run, actors)


def _when(ms: Any) -> str:
    """Ray's job times are epoch milliseconds."""
    if not ms:
        return MISSING
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def job_status_view(info: dict) -> RenderableType:
    """A submitted job (cluster.jobs.job_status)."""
    table = Table(title=f"job {info.get('job_id', MISSING)}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in (("status", _num(info.get("status"))), ("message", info.get("message") or MISSING),
                        ("entrypoint", info.get("entrypoint") or MISSING), ("started", _when(info.get("start_time"))),
                        ("ended", _when(info.get("end_time")))):
        table.add_row(name, value)
    return table


def render_text(renderable: RenderableType, width: int = 120) -> str:
    """Plain text of a renderable (no colour codes), as a terminal of ``width`` columns shows it."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()
