"""A live progress bar for a run, fed by polling the controller's status."""

from __future__ import annotations

import time

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def follow_run(controller, steps: int, console: Console, poll_s: float = 1.0) -> dict:
    """Start ``controller.run`` and show its progress until it returns its summary (or raises)."""
    run_ref = controller.run.remote()
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=steps, detail="")
        while True:
            done, _ = ray.wait([run_ref], timeout=poll_s)
            try:
                s = ray.get(controller.status.remote(), timeout=10)
            except Exception:
                s = None
            if s:
                detail = (
                    f"reward {_fmt(s['reward'], '.3f')}  train acc {_fmt(s['train_accuracy'], '.2f')}  "
                    f"held-out acc {_fmt(s['eval_accuracy'], '.2f')}  v{s['version']}  "
                    f"step {_fmt(s['step_time_s'], '.0f')} s"
                )
                progress.update(task, description=s["phase"], completed=s["version"], detail=detail)
            if done:
                return ray.get(run_ref)
            time.sleep(0)
