"""The `rapo` command line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def _log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


# Errors that mean "fix this input": their message names the file, line or field. Looked up by
# module so that checking for them imports nothing the failed command did not already import.
USER_ERRORS = (
    ("cluster.config", "ConfigError"),
    ("rollout.dataset", "DatasetError"),
    ("rollout.tools.corpus", "CorpusError"),
    ("rewards.judge_client", "JudgeConfigError"),
    ("rollout.safe_encode", "TemplateTokenError"),
)


def is_user_error(error: BaseException | None) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def user_error(error: BaseException) -> int:
    console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
    return 2


def write_traceback(error: BaseException, command: str) -> Path:
    """The full traceback in a file of the cache folder's errors/, for a bug report; its path goes to the user."""
    import traceback

    from cluster.config import default_cache_dir

    folder = default_cache_dir() / "errors"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        import tempfile

        folder = Path(tempfile.gettempdir())
    path = folder / f"rapo-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(error)))
    return path


def internal_error(error: BaseException, command: str) -> int:
    path = write_traceback(error, command)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    console.print(f"[red]internal error:[/] {type(error).__name__}: {first}", highlight=False, soft_wrap=True)
    console.print(f"the full traceback is in {path}", highlight=False, soft_wrap=True)
    return 1


def _load(config: str | None, overrides: list[str], *, local_files: bool = False, model: bool = True):
    """The config, validated; `local_files`: also the files this machine will read (`model`: model.path too)."""
    from cluster.config import ConfigError, check_local_files, load_config

    try:
        cfg = load_config(config, overrides)
        if local_files:
            check_local_files(cfg, model=model)
        return cfg
    except ConfigError as e:
        raise SystemExit(user_error(e)) from None


def _check_run_data(cfg) -> None:
    """A user's question and page files, read once here: a bad row is named before Ray starts."""
    if cfg.data.source == "jsonl":
        from cluster.data import load_run_data

        load_run_data(cfg)


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def cmd_init_model(args) -> int:
    from cluster.model_prep import ensure_policy

    cfg = _load(args.config, args.overrides, local_files=True)
    path = ensure_policy(cfg, log=_log)
    print(path)
    return 0


def _prepare_in_child(cfg, parent: int) -> None:
    from cluster.model_prep import ensure_policy
    from cluster.parent_death import die_with_parent

    die_with_parent(parent)
    try:
        ensure_policy(cfg, log=_log)
    except Exception as e:  # noqa: BLE001 - the child's error boundary: a message, not a traceback
        raise SystemExit(user_error(e) if is_user_error(e) else internal_error(e, "init-model")) from None


def prepare_policy(cfg) -> Path:
    """Build (or find) the starting policy in a child process, so the few GB that conversion and
    the warm start hold go back to the OS before Ray, vLLM and the learner start."""
    import multiprocessing

    from cluster.model_prep import ensure_policy

    child = multiprocessing.get_context("spawn").Process(target=_prepare_in_child, args=(cfg, os.getpid()))
    child.start()
    try:
        child.join()
    finally:
        # Interrupted (Ctrl-C, SIGTERM): the warm start must not go on without us.
        if child.is_alive():
            child.terminate()
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
    if child.exitcode != 0:
        raise SystemExit(f"preparing the policy model failed (exit code {child.exitcode})")
    return ensure_policy(cfg, log=_log)  # now cached: returns the folder at once


def cmd_run(args) -> int:
    import ray
    import yaml

    from cluster.bootstrap import services, weights_dir_for
    from cluster.controller import RunContext, controller_actor
    from cluster.model_prep import model_meta
    from cluster.progress import follow_run
    from cluster.tracking import default_tracking_uri

    cfg = _load(args.config, args.overrides, local_files=True)
    _check_run_data(cfg)
    resume_from = None
    if args.resume:
        output_dir = Path(args.resume).resolve()
        meta_path, latest = output_dir / "run.json", output_dir / "checkpoints" / "rapo_latest"
        if not meta_path.exists() or not latest.exists():
            console.print(
                f"[red]error:[/] {output_dir} holds no checkpoint of a rapo run "
                "(no run.json or checkpoints/rapo_latest)"
            )
            return 2
        run_id = json.loads(meta_path.read_text())["run_id"]
        resume_from = str(latest.parent)
        _log(f"resuming run {run_id} from {output_dir} ({latest.read_text().strip()})")
    else:
        run_id = new_run_id(cfg.name)
        output_dir = Path(args.output_dir or Path("runs") / run_id).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run.json").write_text(json.dumps({"run_id": run_id, "created": time.time()}))
        _log(f"run {run_id} -> {output_dir}")
    (output_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))

    model_dir = prepare_policy(cfg)
    weights_dir = weights_dir_for(run_id, output_dir)
    try:
        with services(cfg, output_dir, log=_log) as svc:
            if svc.dashboard_url:
                _log(f"ray dashboard: {svc.dashboard_url}")
            if svc.metrics_url:
                _log(f"prometheus metrics (ray_rapo_*): {svc.metrics_url}")
            ctx = RunContext(
                run_id=run_id,
                output_dir=str(output_dir),
                model_dir=str(model_dir),
                redis_url=svc.redis_url,
                redis_password=svc.redis_password,
                namespace=cfg.redis.namespace or run_id,
                tracking_uri=cfg.tracking.uri or default_tracking_uri(output_dir),
                weights_dir=str(weights_dir),
                model_meta=model_meta(model_dir),
                resume_from=resume_from,
            )
            controller = controller_actor(svc.node_id).remote(cfg, ctx)
            try:
                with console.status("starting rollout workers and learners..."):
                    info = ray.get(controller.start.remote())
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                if is_user_error(cause):
                    code = user_error(cause)
                else:
                    console.print("[red]the run could not start[/]", highlight=False)
                    code = internal_error(cause if isinstance(cause, BaseException) else e, "run")
                try:
                    ray.get(controller.shutdown.remote(), timeout=120)
                except Exception as e:  # noqa: BLE001 - the start failure is what the user needs to see
                    _log(f"controller shutdown: {type(e).__name__}")
                return code
            _log(f"mlflow run id: {info['mlflow_run_id']} (tracking uri {ctx.tracking_uri})")
            for w in info["workers"]:
                _log(f"{w['name']}: {w['engine']} engine ready in {w['startup_s']:.0f} s")
            first = info["learners"][0] if info.get("learners") else {}
            if first.get("precision"):
                _log(f"learner precision: {first['precision']} ({first.get('precision_reason', '')})")
            if first.get("packed") is not None:
                _log(f"learner micro-batches: {'packed' if first['packed'] else 'padded'} "
                     f"(attention {first.get('attention')})")
            try:
                summary = follow_run(controller, cfg.pipeline.steps, console)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                console.print("[red]run failed[/]", highlight=False)
                internal_error(cause if isinstance(cause, BaseException) else e, "run")
                summary_path = output_dir / "summary.json"
                summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"status": "failed"}
            finally:
                try:
                    ray.get(controller.shutdown.remote(), timeout=120)
                except Exception as e:  # the run's outcome matters more than a clean shutdown
                    _log(f"controller shutdown: {e}")
                ray.kill(controller)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the run[/]")
        return 130
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    _log(f"summary: {output_dir / 'summary.json'}")
    return 0 if summary.get("status") in ("completed", "stopped") else 1


def cmd_eval(args) -> int:
    """Play a policy on a question set (the run's held-out eval, in this process) and report its accuracy."""
    from cluster.evaluate import default_output, resolve_config_path, run_eval
    from rewards.judge_client import JudgeConfigError
    from rollout.dataset import DatasetError

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        console.print(f"[red]error:[/] {model_dir} is not a model folder (no config.json)")
        return 2
    config = resolve_config_path(model_dir, args.config)
    _log(f"config: {config or 'built-in defaults'}")
    cfg = _load(str(config) if config else None, args.overrides, local_files=True, model=False)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its start-up chatter would bury the progress bar
    try:
        summary = run_eval(
            cfg, model_dir, data=args.data, output=Path(args.output or default_output()), console=console, log=_log
        )
    except (DatasetError, JudgeConfigError, FileNotFoundError) as e:
        return user_error(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    print(json.dumps(summary, indent=2))
    return 0


def cmd_serve_judge(args) -> int:
    """vLLM's OpenAI-compatible server on a model folder, for `rewards.judge.base_url`."""
    from rollout.vllm_engine import cpu_env_defaults, on_gpu

    model = Path(args.model_dir)
    if not (model / "config.json").exists():
        console.print(f"[red]error:[/] {model} is not a model folder (no config.json)")
        return 2
    env = dict(os.environ)
    if not on_gpu():
        env.update({k: v for k, v in cpu_env_defaults(args.kv_cache_gib).items() if k not in env})
    key = os.environ.get(args.api_key_env)
    if key:
        # vLLM reads VLLM_API_KEY: the key stays out of the command line, where `ps` would show it.
        env["VLLM_API_KEY"] = key
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--served-model-name",
        args.served_model_name,
        "--max-model-len",
        str(args.max_model_len),
        *args.passthrough,
    ]
    _log(
        f"serving {model} as {args.served_model_name!r} on http://{args.host}:{args.port}/v1"
        + (" (API key required)" if key else " (no API key: set rewards.judge.require_api_key=false)")
    )
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _connect(address: str | None, namespace: str):
    import ray

    ray.init(address=address or "auto", namespace=namespace, log_to_driver=False, logging_level="ERROR")
    try:
        return ray.get_actor("controller")
    except ValueError:
        raise SystemExit(f"no running rapo controller in Ray namespace {namespace!r} at {address or 'auto'}") from None


def cmd_scale(args) -> int:
    """Add or remove rollout workers of a running run, without stopping its learner."""
    import ray

    if args.rollout_workers is None:
        if args.config is None:
            console.print("[red]error:[/] give --rollout-workers N or --config FILE (its rollout.num_workers)")
            return 2
        args.rollout_workers = _load(args.config, args.overrides).rollout.num_workers
    controller = _connect(args.address, args.namespace)
    try:
        result = ray.get(controller.scale.remote(args.rollout_workers))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):  # refused: a number below 1, or a run that is finishing
            return user_error(e.cause)
        raise
    print(json.dumps(result))
    return 0


def cmd_status(args) -> int:
    import ray

    from cluster.status_view import job_status_view, run_status_view

    if args.job_id:
        from cluster.jobs import job_status

        info = job_status(args.address, args.job_id)
        _print_status(info, job_status_view, args.json)
        return 0
    controller = _connect(args.address, args.namespace)
    status, actors = ray.get([controller.status.remote(), controller.actors.remote()])
    _print_status({**status, "actors": actors}, run_status_view, args.json)
    return 0


def _print_status(status: dict, view, as_json: bool) -> None:
    """The raw dict for scripts (--json), else the table on stdout."""
    if as_json:
        print(json.dumps(status, indent=2, default=str))
    else:
        Console().print(view(status))


def cmd_submit(args) -> int:
    from cluster import jobs

    cfg = _load(args.config, args.overrides)  # validated here, before anything reaches the cluster
    del cfg
    job_id = jobs.submit(args.address, args.config, args.overrides, output_dir=args.output_dir, pip=args.pip or None,
                         log=_log)
    _log(f"submitted job {job_id} to {args.address}")
    print(job_id)
    if not args.wait:
        return 0
    status = jobs.follow(args.address, job_id, lambda chunk: sys.stderr.write(chunk))
    _log(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_logs(args) -> int:
    from cluster import jobs

    if args.follow:
        status = jobs.follow(args.address, args.job_id, lambda chunk: sys.stdout.write(chunk))
        return 0 if status == "SUCCEEDED" else 1
    sys.stdout.write(jobs.logs(args.address, args.job_id))
    return 0


def cmd_stop(args) -> int:
    from cluster import jobs

    if args.job_id is None:
        # A live run (no job id): it ends after the step in progress, with its summary and checkpoint.
        import ray

        controller = _connect(args.address, args.namespace)
        at = ray.get(controller.request_stop.remote())
        _log(f"run stopping after step {at['step'] + 1} of {at['steps']} (then final eval, checkpoint, summary)")
        return 0
    if args.address is None:
        console.print("[red]error:[/] a job's stop needs --address http://HEAD:8265")
        return 2
    stopped = jobs.stop(args.address, args.job_id)
    _log(f"job {args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapo", description="RAPO training of deep-research agents on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run training (starts local Ray + Redis unless the config names them)")
    run.add_argument("config", help="YAML config, e.g. deploy/configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    run.add_argument("--output-dir", help="run folder (default: runs/<run id>)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.set_defaults(func=cmd_run)

    init = sub.add_parser("init-model", help="build the starting policy (convert + warm start) and print its folder")
    init.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    init.add_argument("overrides", nargs="*")
    init.set_defaults(func=cmd_init_model)

    scale = sub.add_parser("scale", help="change the number of rollout workers of a running run")
    scale.add_argument("--rollout-workers", type=int, help="the new number of rollout workers")
    scale.add_argument("--config", help="take rollout.num_workers from this config (with overrides)")
    scale.add_argument("overrides", nargs="*")
    scale.add_argument("--address", help="Ray address of the run's cluster (default: auto)")
    scale.add_argument("--namespace", default="rapo", help="the run's ray.namespace")
    scale.set_defaults(func=cmd_scale)

    status = sub.add_parser("status", help="a running run's progress and actors, or a submitted job's status")
    status.add_argument("job_id", nargs="?", help="a Ray job id (from `rapo submit`); omit for the live run")
    status.add_argument("--address", help="Ray address (jobs: the dashboard URL, http://HEAD:8265)")
    status.add_argument("--namespace", default="rapo")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON (for scripts)")
    status.set_defaults(func=cmd_status)

    submit = sub.add_parser("submit", help="submit `rapo run CONFIG` as a Ray job (uploads this repository)")
    submit.add_argument("config")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument("--address", required=True, help="the cluster's dashboard URL, e.g. http://HEAD:8265")
    submit.add_argument("--output-dir", help="run folder on the cluster (a shared volume on multi-node clusters)")
    submit.add_argument("--pip", action="append", help="extra pip requirement for the job's runtime_env (repeatable)")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs and exit with its status")
    submit.set_defaults(func=cmd_submit)

    job_logs = sub.add_parser("logs", help="a submitted job's logs")
    job_logs.add_argument("job_id")
    job_logs.add_argument("--address", required=True)
    job_logs.add_argument("--follow", "-f", action="store_true")
    job_logs.set_defaults(func=cmd_logs)

    stop = sub.add_parser(
        "stop", help="end a running run after its current step (summary, checkpoint), or stop a submitted job"
    )
    stop.add_argument("job_id", nargs="?", help="a submitted job's id (without it: the run on --address)")
    stop.add_argument("--address", help="Ray address (a job: the dashboard's http://HEAD:8265; a run: default auto)")
    stop.add_argument("--namespace", default="rapo", help="the run's ray.namespace")
    stop.set_defaults(func=cmd_stop)

    evaluate = sub.add_parser(
        "eval", help="run a policy on a question set and report accuracy, tool calls and response tokens per question"
    )
    evaluate.add_argument("model_dir", help="a model folder, e.g. RUN/policy (the final policy of `rapo run`)")
    evaluate.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. rewards.judge.base_url=URL")
    evaluate.add_argument(
        "--config", help="YAML config (default: RUN/config.yaml for RUN/policy, else deploy/configs/demo.yaml)"
    )
    evaluate.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help='questions {"id"?, "question", "answer", "aliases"?} (default: the config\'s held-out set)',
    )
    evaluate.add_argument(
        "--output",
        metavar="FILE",
        help="per-question results JSONL (default: rapo-eval-<time>.jsonl); the summary "
        "goes beside it (r.jsonl -> r.summary.json)",
    )
    evaluate.set_defaults(func=cmd_eval)

    judge = sub.add_parser(
        "serve-judge", help="serve a judge model with vLLM's OpenAI-compatible server (extra vLLM flags after --)"
    )
    judge.add_argument("model_dir")
    judge.add_argument("--host", default="127.0.0.1")
    judge.add_argument("--port", type=int, default=8000)
    judge.add_argument("--served-model-name", default="judge")
    judge.add_argument("--max-model-len", type=int, default=4096)
    judge.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU only: vLLM's KV cache size")
    judge.add_argument("--api-key-env", default="RAPO_JUDGE_API_KEY", help="env var whose key clients must send")
    judge.set_defaults(func=cmd_serve_judge)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.bootstrap import ACTOR_ENV

    for key, value in ACTOR_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` goes to the wrapped program (vLLM's server) untouched.
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args, extra = parser.parse_known_args(argv)
    args.passthrough = passthrough
    # Overrides may come after options too (`rapo run c.yaml --output-dir d a.b=1`).
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except Exception as e:  # noqa: BLE001 - the command's error boundary
        return user_error(e) if is_user_error(e) else internal_error(e, args.command)


if __name__ == "__main__":
    sys.exit(main())
