"""`rapo eval`: play a policy on a question set the way a run's held-out eval does, and score it.

The episodes are the controller's eval episodes (same requests, seeds, temperature, engine
settings, tools and limits), run in this process: one engine, the agent loop, the toolbox,
then the reward labeller's scoring (the LLM judge when `rewards.judge` is set, else the
rule judge). So `rapo eval RUN/policy` on the run's held-out set reports the accuracy the
run's summary reports for its final policy.

The requests, engine settings and result rows are built by cluster.engines, which the
controller uses for its held-out eval too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.config import RunConfig
from cluster.engines import engine_spec, episode_limits, eval_requests, eval_row

if TYPE_CHECKING:
    from rich.console import Console

    from rewards.report import PoolReport
    from rollout.episodes import EpisodeRequest
    from rollout.tools.corpus import Document
    from rollout.types import Question, Trajectory

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "deploy" / "configs" / "demo.yaml"


def run_config_of(model_dir: Path) -> Path | None:
    """The config of the run whose exported policy `model_dir` is (RUN/policy -> RUN/config.yaml)."""
    config = model_dir.resolve().parent / "config.yaml"
    return config if (model_dir / "rapo_policy.json").exists() and config.exists() else None


def resolve_config_path(model_dir: Path, config: str | Path | None) -> Path | None:
    """--config, else the run's config for a run's policy folder, else the demo config (None: built-in defaults)."""
    if config is not None:
        return Path(config)
    return run_config_of(model_dir) or (DEMO_CONFIG if DEMO_CONFIG.exists() else None)


# ---- rapo eval --------------------------------------------------------------------------------
def eval_questions(cfg: RunConfig, data: str | Path | None) -> tuple[list[Question], list[Document]]:
    """The questions (`data` JSONL, else the config's held-out set) and the pages the tools search.

    A bad row raises rollout.dataset.DatasetError naming the file, line and field.
    """
    from cluster.data import load_run_data
    from rollout.dataset import load_questions_jsonl

    questions = load_questions_jsonl(data) if data is not None else None
    run_data = load_run_data(cfg)
    return (questions if questions is not None else run_data.heldout), run_data.documents


async def play_and_score(
    cfg: RunConfig,
    model_dir: Path,
    questions: list[Question],
    documents: list[Document],
    on_episode: Callable[[Trajectory], None] = lambda t: None,
    on_ready: Callable[[str, float], None] = lambda k, s: None,
) -> tuple[list[Trajectory], PoolReport]:
    """Every question's eval episode on a fresh engine for `model_dir`, scored; trajectories in question order.

    Returns them with the judge's tally, as the reward pool keeps it: where the verdicts came from
    (rule / llm / cache / skipped), step labels, retries and fallbacks to the rule judge.
    """
    from transformers import AutoTokenizer

    from rewards.report import PoolReport
    from rewards.scoring import apply_score, score_or_fail
    from rollout.agent_loop import AgentLoop, EpisodeSampling
    from rollout.engine_factory import create_engine, resolve_engine_kind
    from rollout.tools.backends import tool_backend
    from rollout.tools.toolbox import Toolbox

    r, rewards = cfg.rollout, cfg.rewards
    by_id = {q.id: q for q in questions}
    judge = extractor = engine = backend = None
    try:
        if rewards.judge is not None:
            from rewards.judge_client import JudgeClient

            judge = JudgeClient(rewards.judge)  # first: a missing API key stops it before the engine starts
        t0 = time.perf_counter()
        kind = resolve_engine_kind(r.engine)
        engine = create_engine(kind, engine_spec(cfg, model_dir, kind))
        on_ready(engine.name, time.perf_counter() - t0)
        backend = tool_backend(cfg.tools, documents, None)
        if cfg.tools.extractor is not None:
            from rollout.tools.extractor import LLMExtractor

            extractor = LLMExtractor(cfg.tools.extractor)
        loop = AgentLoop(
            engine,
            Toolbox.from_config(cfg.tools, backend, extractor),
            AutoTokenizer.from_pretrained(model_dir),
            episode_limits(r),
        )
        episodes = asyncio.Semaphore(r.max_concurrent_episodes)
        judging = asyncio.Semaphore(rewards.max_in_flight_per_actor)
        report = PoolReport()
        spec, llm_labels = rewards.spec(), rewards.uses_llm_labels()

        async def one(i: int, req: EpisodeRequest) -> Trajectory:
            async with episodes:
                sampling = EpisodeSampling(req.temperature, req.top_p, req.seed)
                traj = await loop.run(req.question, req.sample_index, sampling, f"eval-{i}")
            async with judging:
                score = await score_or_fail(traj, by_id[traj.question_id], spec, judge, llm_labels)
            apply_score(traj, score)
            report.add(score)
            on_episode(traj)
            return traj

        trajs = await asyncio.gather(*(one(i, req) for i, req in enumerate(eval_requests(questions, cfg.pipeline))))
        return list(trajs), report
    finally:
        for part, close in ((engine, "shutdown"), (backend, "close"), (extractor, "close"), (judge, "close")):
            if part is not None:
                await getattr(part, close)()


def result_row(t: Trajectory, q: Question) -> dict[str, Any]:
    """One line of `rapo eval`'s results: the question and gold answers beside the run's eval row."""
    row = eval_row(t)
    return {
        "id": row.pop("id"),
        "question": q.question,
        "gold": q.answer,
        "aliases": list(q.aliases),
        **row,
        "reward": t.reward,
    }


def eval_summary(trajs: list[Trajectory], report: PoolReport, **about: Any) -> dict[str, Any]:
    from cluster.run_metrics import trajectory_metrics

    m = trajectory_metrics(trajs, "eval")
    return {
        "accuracy": m.get("eval/accuracy", 0.0),
        "correct": sum(bool(t.correct) for t in trajs),
        "questions": len(trajs),
        "failed_episodes": sum(bool(t.error) for t in trajs),
        "tool_calls_per_question": m.get("eval/tool_calls_per_episode", 0.0),
        "response_tokens_per_question": m.get("eval/response_tokens", 0.0),
        **about,
        "metrics": m,
        "judge_report": report.metrics(),
    }


def default_output(now: float | None = None) -> Path:
    return Path(f"rapo-eval-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.jsonl")


def summary_path_for(output: Path) -> Path:
    """results.jsonl -> results.summary.json (beside it)."""
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")


def run_eval(
    cfg: RunConfig,
    model_dir: Path,
    *,
    data: str | Path | None,
    output: Path,
    console: Console,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`rapo eval`: load the questions, play and score them with a progress bar, write results and summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    questions, documents = eval_questions(cfg, data)
    output.parent.mkdir(parents=True, exist_ok=True)  # an unusable --output fails now, not after the episodes
    source = str(data) if data is not None else f"held-out set of data.source={cfg.data.source} (seed {cfg.data.seed})"
    judge = f"llm {cfg.rewards.judge.model} at {cfg.rewards.judge.base_url}" if cfg.rewards.judge else "rule"
    log(f"{len(questions)} questions from {source}; judge: {judge}; eval temperature {cfg.pipeline.eval_temperature}")
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting the engine", total=len(questions), detail="")
        done: list[Trajectory] = []

        def on_ready(engine: str, seconds: float) -> None:
            progress.update(task, description="evaluating", detail=f"{engine} engine ready in {seconds:.0f} s")

        def on_episode(t: Trajectory) -> None:
            done.append(t)
            right = sum(bool(d.correct) for d in done)
            progress.update(task, advance=1, detail=f"accuracy {right / len(done):.3f} ({right}/{len(done)})")

        trajs, report = asyncio.run(play_and_score(cfg, model_dir, questions, documents, on_episode, on_ready))
    with open(output, "w", encoding="utf-8") as fh:
        for t, q in zip(trajs, questions):
            fh.write(json.dumps(result_row(t, q)) + "\n")
    summary = eval_summary(
        trajs,
        report,
        model_dir=str(model_dir),
        data=str(data) if data is not None else "heldout",
        judge=judge,
        eval_temperature=cfg.pipeline.eval_temperature,
        seed=cfg.pipeline.seed,
        results=str(output),
        wall_time_s=time.perf_counter() - t0,
    )
    summary_path_for(output).write_text(json.dumps(summary, indent=2))
    log(
        f"accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['questions']}); "
        f"{summary['tool_calls_per_question']:.2f} tool calls and {summary['response_tokens_per_question']:.0f} "
        f"response tokens per question"
    )
    log(f"results: {output}; summary: {summary_path_for(output)}")
    return summary
