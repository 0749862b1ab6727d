"""MLflow tracking: params, per-step metrics, artifacts; plus the reward-curve PNG.

Without `tracking.uri` the store is a sqlite file in the run folder (works offline; MLflow
refuses a plain ./mlruns file store by default), with artifacts beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cluster.redact import SECRET_KEY, mask_url_passwords


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Config params for MLflow with anything secret-looking dropped or masked, values stringified and clipped."""
    out = {}
    for key, value in params.items():
        if SECRET_KEY.search(key) and value is not None and not isinstance(value, bool):
            continue
        out[key] = mask_url_passwords(str(value))[:500]
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str, output_dir: Path):
        import mlflow

        self.mlflow = mlflow
        self.output_dir = output_dir
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:"):
                # Otherwise MLflow puts artifacts under ./mlruns of whatever the cwd is.
                location = (output_dir / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = exp.experiment_id
        self.experiment_id = experiment_id
        self.run_id: str | None = None

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> str:
        """A new MLflow run, or the one a resumed run continues (its metrics carry on by step)."""
        if resume_run_id:
            run = self.mlflow.start_run(run_id=resume_run_id)
            self.run_id = run.info.run_id
            return self.run_id
        run = self.mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self.mlflow.log_params(safe_params(params))
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.mlflow.end_run(status=status)


def plot_curves(history: list[dict[str, float]], evals: list[dict[str, float]], path: Path, title: str) -> Path:
    """Reward, training accuracy and held-out accuracy per step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [h["step"] for h in history]
    panels = [
        ("reward/mean", "reward (train batch)"),
        ("train/accuracy", "accuracy (train batch)"),
    ]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot([e["step"] for e in evals], [e["eval/accuracy"] for e in evals], marker="s", color="tab:green")
    ax.set_title("held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
