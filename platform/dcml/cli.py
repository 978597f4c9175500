"""The `dcml` command: one verb per stage, and `run` for the whole pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import typer

from dcml import console
from dcml.cli_catalog import data_app, gc, models_app
from dcml.cli_common import ConfigArg, ConfigOpt, SetOpt, config_of
from dcml.config import ConfigError, PipelineConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="dcml: data, training, tuning and serving of models on Ray.",
)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.command()(gc)

# Errors a user can fix: print the message, not a traceback (DCML_DEBUG=1 shows it).
USER_ERRORS = (ConfigError, LookupError, OSError, ValueError, RuntimeError)


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Show Ray's own output too: its logs, warnings, progress bars and banners "
        "(DCML_LOG=debug does the same). By default only dcml's lines and progress show.",
    ),
) -> None:
    console.enable(verbose=verbose)


def _log(msg: str) -> None:
    typer.echo(msg)


def _quiet_ray() -> None:
    """Ray's loggers in this process at ERROR unless -v, for a command that uses Ray without
    starting or joining it (`connect` sets them by cluster.quiet)."""
    if not console.verbose():
        import logging

        import ray  # noqa: F401  (sets its loggers' levels on import)

        logging.getLogger("ray").setLevel(logging.ERROR)


@app.command()
def run(
    config: Path | None = ConfigArg,
    set_: list[str] | None = SetOpt,
    serve_forever: bool = typer.Option(False, help="Keep serving after the demo requests."),
):
    """The whole pipeline: collect, preprocess, train, tune, register, deploy, query over HTTP."""
    from dcml.pipeline import run_pipeline

    cfg = config_of(config, set_)
    run_pipeline(cfg, _log, keep_serving=serve_forever)
    if serve_forever:
        _block(cfg)
    _shutdown(cfg if serve_forever else None)


@app.command()
def preprocess(config: Path | None = ConfigArg, set_: list[str] | None = SetOpt):
    """Read raw shards, clean, split, fit transforms, gate and store a dataset version."""
    from dcml.pipeline import stage_preprocess

    dv = stage_preprocess(config_of(config, set_), _log)
    typer.echo(f"dataset: {dv.ref}")
    _shutdown()


@app.command()
def train(
    config: Path | None = ConfigArg,
    set_: list[str] | None = SetOpt,
    dataset: str | None = typer.Option(None, help="NAME[@VERSION]; default: latest."),
    run_id: str | None = typer.Option(None, help="Id of a new run (default: generated)."),
    resume: str | None = typer.Option(
        None,
        help="RUN_ID: continue a stored run from its last checkpoint, with its config "
        "(plus any --set) and dataset.",
    ),
    register: bool = typer.Option(True, help="Register the best checkpoint."),
    alias: list[str] | None = typer.Option(None, help="Aliases for the registered version."),
):
    """Train with Ray Train on a stored dataset version: an MLP (DDP) or trees (XGBoost)."""
    from dcml.pipeline import resumed_config, stage_register, stage_train

    cfg = config_of(config, set_)
    if resume:
        if run_id and run_id != resume:
            raise ValueError("give --resume RUN_ID alone, without another --run-id")
        cfg = resumed_config(cfg, resume, set_)
    dv, outcome = stage_train(cfg, dataset, resume or run_id, _log, resume=bool(resume))
    if register:
        stage_register(
            cfg, dv, outcome.checkpoint_path, {"run_id": outcome.run_id}, alias or [], _log
        )
    _shutdown()


@app.command()
def tune(
    config: Path | None = ConfigArg,
    set_: list[str] | None = SetOpt,
    dataset: str | None = typer.Option(None, help="NAME[@VERSION]; default: latest."),
    sweep_id: str | None = typer.Option(None, help="Id of a new sweep (default: generated)."),
    resume: str | None = typer.Option(
        None,
        help="SWEEP_ID: continue an interrupted sweep; finished trials are kept, unfinished "
        "ones go on from their last checkpoint.",
    ),
    register: bool = typer.Option(True, help="Register the best trial's checkpoint."),
    alias: list[str] | None = typer.Option(None, help="Aliases for the registered version."),
):
    """Sweep the search space (`tune.space`; by default the family's: lr and depth, or eta and
    max_depth for gbdt) with Ray Tune."""
    from dcml.pipeline import resumed_config, stage_register, stage_tune

    cfg = config_of(config, set_)
    if resume:
        if sweep_id and sweep_id != resume:
            raise ValueError("give --resume SWEEP_ID alone, without another --sweep-id")
        cfg = resumed_config(cfg, resume, set_)
    dv, outcome = stage_tune(cfg, dataset, resume or sweep_id, _log, resume=bool(resume))
    if register:
        lineage = {"sweep_id": outcome.sweep_id, "params": outcome.params}
        stage_register(cfg, dv, outcome.checkpoint_path, lineage, alias or [], _log)
    _shutdown()


@app.command()
def serve(
    model: str = typer.Argument(..., help="NAME@ALIAS, NAME@VERSION or NAME."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Serve a model version over HTTP on Ray Serve until interrupted."""
    from dcml.cluster import catch_stop, connect
    from dcml.serving import deploy, metrics_url

    cfg = config_of(config, set_)
    catch_stop()  # a stop while starting (Serve takes seconds) stops it cleanly once started
    connect(cfg.cluster)
    catch_stop()  # again: Ray's start put its own SIGTERM handler in place
    url = deploy(cfg, model)
    if cfg.serve.metrics and (metrics := metrics_url()):
        typer.echo(f"metrics (Prometheus): {metrics}")
    if cfg.serve.log_fraction:
        typer.echo(f"logging {cfg.serve.log_fraction:.0%} of records for `dcml monitor {model}`")
    typer.echo(f"serving {model} at {url}/predict (docs at {url}/docs); Ctrl-C stops")
    _block(cfg)
    _shutdown(cfg)


@app.command()
def predict(
    model: str = typer.Argument(..., help="NAME@ALIAS, NAME@VERSION or NAME."),
    input: str = typer.Option(..., "--input", "-i", help="Raw data URI (file, folder, glob)."),
    output: str = typer.Option(..., "--output", "-o", help="Output folder URI (new)."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Batch inference: Parquet of id, prediction, model version (+ predict.passthrough=[col]);
    unscorable rows in OUTPUT/tx-*/_rejects/. No Ray unless cluster.address or RAY_ADDRESS names a
    cluster (then Ray Data). See docs/serving.md; without -c the storage root is ./dcml-store."""
    from dcml.batch import described, predict_batch

    cfg = config_of(config, set_)
    typer.echo(described(predict_batch(cfg, model, input, output, _log), output))
    _shutdown()


@app.command()
def monitor(
    model: str = typer.Argument(..., help="NAME@ALIAS, NAME@VERSION or NAME."),
    since: str | None = typer.Option(
        None, help="Traffic from this long ago (30m, 24h, 7d) or this date; default monitor.since."
    ),
    labels: str | None = typer.Option(
        None, help="URI of a file of id,label (CSV, Parquet, JSON Lines): live metrics."
    ),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Compare logged traffic (serve.log_fraction) with the training data: PSI, KS, missing and
    unseen values per feature, the predictions' shift, and with --labels the live metrics. Writes
    an HTML page; exits 3 when a monitor.* threshold is crossed."""
    import dcml.monitor as watch
    from dcml.registry import resolve_model
    from dcml.storage import Storage

    cfg = config_of(config, set_)
    storage = Storage.from_config(cfg)
    mv = resolve_model(storage, model)
    truth = _read_labels(labels, cfg) if labels else None
    since_t = watch.parse_since(since or cfg.monitor.since)
    result = watch.monitor(storage, mv, model, cfg.monitor, since_t, truth, labels or "")
    typer.echo(f"{mv.ref} ({model}): {watch.window(result)}")
    for note in (result.note, result.labels_note):
        if note:
            typer.echo(note)
    if result.checks:
        typer.echo(result.table())
    try:
        typer.echo(f"page: {watch.write_page(storage, result, cfg.monitor)}")
    except OSError as e:  # the verdict still stands, and so does its exit code
        typer.echo(f"warning: the page could not be written: {e}", err=True)
    if result.checks and not result.flagged:
        typer.echo(f"no drift: all {len(result.checks)} checks within their limits")
    if result.flagged:
        names = sorted({f"{c.subject} ({c.check})" for c in result.flagged})
        typer.echo(f"drift: {', '.join(names)}")
        raise typer.Exit(3)


def _read_labels(uri: str, cfg: PipelineConfig):
    """A labels file (id, label) by URI, in any format dcml reads."""
    import fsspec

    from dcml.data.sources import format_of, read_file

    options = cfg.data.storage_options or cfg.storage.storage_options
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if not fs.exists(path):
        raise FileNotFoundError(f"--labels: no file at {uri}")
    fmt = format_of(path)
    if fmt is None:
        raise ValueError(f"--labels: {uri} is not .csv, .parquet or .jsonl")
    return read_file(fs, path, fmt, text_columns=["id"])


@app.command()
def submit(
    config: Path = typer.Argument(..., help="Pipeline config (YAML), inside the repository."),
    stage: str = typer.Option("pipeline", help="pipeline, preprocess, train or tune."),
    address: str = typer.Option(
        None, envvar="RAY_API_SERVER_ADDRESS", help="Dashboard of the cluster: http://HEAD:8265."
    ),
    run_id: str | None = typer.Option(None, help="Train run / sweep id (resubmit to resume)."),
    runtime_env: Path | None = typer.Option(
        None, help="The job's runtime env (YAML); default: jobs/runtime_env.yaml."
    ),
    set_: list[str] | None = SetOpt,
):
    """Submit a stage as a Ray job (dcml and the repository travel with it)."""
    from dcml.submit import ID_FLAGS
    from dcml.submit import submit as submit_job
    from dcml.train.trainer import new_run_id

    load_config(config, set_ or [])  # a bad config fails here, not on the cluster
    _quiet_ray()  # the job client's notes on what the upload leaves out
    address = address or "http://127.0.0.1:8265"
    if stage in ID_FLAGS:
        run_id = run_id or new_run_id(stage if stage == "train" else "sweep")
    job_id = submit_job(address, stage, str(config), set_ or [], run_id, runtime_env)
    typer.echo(f"submitted job {job_id} to {address}")
    typer.echo(f"follow it: ray job logs --follow {job_id} --address {address}")
    if run_id:
        typer.echo(f"{stage} {run_id}: if the job dies, the same command with --run-id {run_id}")
        typer.echo("resumes it from its last checkpoint")


@app.command()
def report(
    run_id: str = typer.Argument(..., help="The pipeline run's training run id."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Print the URI of a pipeline run's HTML report (runs/RUN_ID/report.html)."""
    from dcml.layout import run_folder
    from dcml.report import report_path
    from dcml.storage import Storage

    storage = Storage.from_config(config_of(config, set_))
    path = report_path(storage, run_id)
    if not storage.exists(path):
        where = storage.uri("runs")
        if not storage.exists(run_folder(storage, run_id)):
            raise LookupError(f"no run {run_id!r} under {where}")
        raise LookupError(
            f"run {run_id!r} has no report.html under {where}: reports are written by `dcml run` "
            "(the whole pipeline), for its training run"
        )
    typer.echo(storage.to_uri(path))


def _block(cfg: PipelineConfig) -> None:
    from dcml.cluster import owns_ray, wait_for_stop

    wait_for_stop()
    if owns_ray():
        typer.echo("stopping: finishing the requests in flight, then shutting down")
    else:
        typer.echo(f"stopping: {cfg.serve.app_name!r} keeps serving on the cluster")


def _shutdown(serving: PipelineConfig | None = None) -> None:
    from dcml.cluster import shutdown

    shutdown(serving.serve.app_name if serving else None)


def main(argv: list[str] | None = None) -> int:
    try:
        result = app(args=argv, standalone_mode=False)
    except (typer.Exit, click.exceptions.Exit) as e:
        return e.exit_code
    except (typer.TyperException, click.ClickException) as e:  # usage errors (typer vendors click)
        if hasattr(e, "show"):
            e.show()
        else:
            typer.echo(f"error: {e}", err=True)
        return getattr(e, "exit_code", 2)
    except (typer.Abort, click.Abort, KeyboardInterrupt):
        _shutdown()
        return 130
    except Exception as e:
        message = error_message(e)
        if os.environ.get("DCML_DEBUG") or message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        _shutdown()
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        console.enable(False)
    return result if isinstance(result, int) else 0


def error_message(e: Exception) -> str | None:
    """The one line `error:` prints, or None for a traceback (an error that is not the user's).
    An error raised in a Ray task or a training worker comes back wrapped, its text the remote
    traceback: its own error is named instead (DCML_DEBUG=1 shows the traceback)."""
    if failures := getattr(e, "worker_failures", None):  # ray.train.WorkerGroupError
        # the cause first: a worker's own error, not another's lost connection to that worker
        rank = min(failures, key=lambda r: (_collective(failures[r]), r))
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"training worker {rank} failed{more}: {_named(failures[rank])}"
    if failure := getattr(e, "controller_failure", None):  # ray.train.ControllerError
        return f"training failed: {_named(failure)}"
    ray_errors = sys.modules.get("ray.exceptions")
    if ray_errors is not None and isinstance(e, ray_errors.RayError):
        return _named(e)
    return str(e) if isinstance(e, USER_ERRORS) else None


def _named(e: BaseException) -> str:
    """A user's error by its message; any other with its type, and where to see the rest."""
    ray_errors = sys.modules.get("ray.exceptions")
    if ray_errors is not None and isinstance(e, ray_errors.RayError):
        cause = getattr(e, "cause", None)  # RayTaskError: what the task raised
        if isinstance(cause, BaseException) and not isinstance(cause, ray_errors.RayError):
            return _named(cause)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = [line for line in lines[1:] if " because " in line][:1]  # an actor's death
        return f"{type(e).__name__}: {' '.join(lines[:1] + why)} (DCML_DEBUG=1 shows more)"
    if isinstance(e, USER_ERRORS):
        return str(e)
    return f"{type(e).__name__}: {console.last_line(str(e))} (DCML_DEBUG=1 shows the traceback)"


def _collective(e: BaseException) -> bool:
    """Whether a worker's error is its lost connection to another (gloo's, NCCL's)."""
    return any(name in str(e).lower() for name in ("gloo", "nccl"))


if __name__ == "__main__":
    sys.exit(main())
