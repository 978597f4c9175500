"""The `dcml` command: one verb per stage, and `run` for the whole pipeline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import typer

from dcml.config import ConfigError, PipelineConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="dcml: data, training, tuning and serving of models on Ray.",
)
models_app = typer.Typer(no_args_is_help=True, help="Registered model versions and aliases.")
data_app = typer.Typer(no_args_is_help=True, help="Stored dataset versions.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

ConfigArg = typer.Argument(None, help="Pipeline config (YAML); defaults apply where omitted.")
ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline config (YAML).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: section.field=value.")

# Errors a user can fix: print the message, not a traceback (DCML_DEBUG=1 shows it).
USER_ERRORS = (ConfigError, LookupError, OSError, ValueError, RuntimeError)


def _config(path: Path | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(path, overrides or [])


def _log(msg: str) -> None:
    typer.echo(msg)


@app.command()
def run(
    config: Path | None = ConfigArg,
    set_: list[str] | None = SetOpt,
    serve_forever: bool = typer.Option(False, help="Keep serving after the demo requests."),
):
    """The whole pipeline: collect, preprocess, train, tune, register, deploy, query over HTTP."""
    from dcml.pipeline import run_pipeline

    cfg = _config(config, set_)
    run_pipeline(cfg, _log, keep_serving=serve_forever)
    if serve_forever:
        _block(cfg)
    _shutdown(cfg if serve_forever else None)


@app.command()
def preprocess(config: Path | None = ConfigArg, set_: list[str] | None = SetOpt):
    """Read raw shards, clean, split, fit transforms, gate and store a dataset version."""
    from dcml.pipeline import stage_preprocess

    dv = stage_preprocess(_config(config, set_), _log)
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
    """Train with Ray Train (DDP) on a stored dataset version."""
    from dcml.pipeline import resumed_config, stage_register, stage_train

    cfg = _config(config, set_)
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
    """Sweep the search space (`tune.space`; lr and depth by default) with Ray Tune."""
    from dcml.pipeline import resumed_config, stage_register, stage_tune

    cfg = _config(config, set_)
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
    from dcml.cluster import connect
    from dcml.serving import deploy

    cfg = _config(config, set_)
    connect(cfg.cluster)
    url = deploy(cfg, model)
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

    cfg = _config(config, set_)
    typer.echo(described(predict_batch(cfg, model, input, output, _log), output))
    _shutdown()


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

    storage = Storage.from_config(_config(config, set_))
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


@models_app.command("list")
def models_list(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt):
    """Registered models, their versions and aliases."""
    from dcml import registry
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    for name, versions in registry.list_models(storage).items():
        aliases = registry.aliases(storage, name)
        shown = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items()))
        typer.echo(f"{name}: versions {versions}" + (f"; aliases {shown}" if shown else ""))


@models_app.command("show")
def models_show(model: str, config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt):
    """One model version's metadata (without the preprocessor state)."""
    from dcml import registry
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    mv = registry.resolve_model(storage, model)
    shown = {k: v for k, v in mv.meta.items() if k not in ("preprocessor", "config")}
    held = registry.aliases(storage, mv.name).items()
    shown["aliases"] = sorted(a for a, v in held if v == mv.version)
    typer.echo(json.dumps(shown, indent=2, sort_keys=True, default=str))


@models_app.command("verify")
def models_verify(
    model: str = typer.Argument(..., help="NAME@VERSION, NAME@ALIAS or NAME."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Recompute every file's size and SHA-256 against the version's model.json; exit 1 naming
    each missing, extra or altered file."""
    from dcml import registry
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    mv = registry.resolve_model(storage, model)
    _report_verified(mv.ref, registry.verify_version(storage, mv), len(mv.meta.get("files", [])))


def _report_verified(ref: str, problems: list[str], files: int) -> None:
    if problems:
        for p in problems:
            typer.echo(p, err=True)
        typer.echo(f"{ref}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{ref}: all {files} file(s) match the manifest")


@models_app.command("promote")
def models_promote(
    name: str,
    version: int,
    alias: str = typer.Option("production"),
    force: bool = typer.Option(False, help="Promote even if its test metric is worse."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Point an alias (default: production) at a version; refused if the version's test metric
    is worse than the alias's current version's, unless --force."""
    from dcml import registry
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    before = registry.set_alias(storage, name, alias, version, force=force)
    typer.echo(f"{name}@{alias} -> {version}" + (f" (was {before})" if before else ""))


@models_app.command("rollback")
def models_rollback(
    name: str,
    alias: str = typer.Option("production"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Point an alias back at the version it had before its latest promotion."""
    from dcml import registry
    from dcml.storage import Storage

    version = registry.rollback(Storage.from_config(_config(config, set_)), name, alias)
    typer.echo(f"{name}@{alias} -> {version} (rolled back)")


@data_app.command("list")
def data_list(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt):
    """Committed dataset versions, oldest first."""
    import time

    from dcml.data.catalog import list_versions
    from dcml.layout import dataset_folder
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    typer.echo(f"{'dataset':<32}{'created (UTC)':<22}{'train':>9}{'valid':>9}{'test':>9}  content")
    for name in storage.ls(dataset_folder(storage)):
        for v in list_versions(storage, name):
            m, rows = v.manifest, v.manifest["rows"]
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["created_at"]))
            typer.echo(
                f"{v.ref:<32}{created:<22}{rows['train']:>9}{rows['validation']:>9}"
                f"{rows['test']:>9}  {m.get('content_hash', '')[:12]}"
            )


@data_app.command("show")
def data_show(
    ref: str = typer.Argument(..., help="NAME[@VERSION]; default: the latest version."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """A dataset version: source, rows by split and drop reason, features, the gate's report."""
    from dcml.data.catalog import resolve_dataset
    from dcml.data.gate import CheckResult, GateReport
    from dcml.storage import Storage

    dv = resolve_dataset(Storage.from_config(_config(config, set_)), ref)
    m = dv.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=2, sort_keys=True, default=str))
        return
    rows = m["rows"]
    dropped = ", ".join(f"{n} {why}" for why, n in rows["dropped"].items() if n) or "none"
    cols = m["columns"]
    sources = len(m.get("source_files", m.get("files", [])))  # "files" before manifest format 3
    report = GateReport([[CheckResult(**c) for c in r] for r in m["gate"]["rounds"]])
    typer.echo(
        f"dataset      {dv.ref}\n"
        f"source       {m['source']} ({sources} {m['format']} file(s))\n"
        f"task         {m['task']}" + (f", classes {m['classes']}" if m["classes"] else "") + "\n"
        f"rows         {rows['raw']} raw; train {rows['train']}, validation {rows['validation']}, "
        f"test {rows['test']}; augmented {rows['augmented']}\n"
        f"dropped      {dropped}\n"
        f"inputs       {len(cols['numeric'])} numeric, {len(cols['categorical'])} categorical "
        f"-> {len(m['features'])} model features\n"
        f"shards       {len(m['shards'])}; content hash {m['content_hash']}\n"
        f"gate\n{report.table()}"
    )


@data_app.command("verify")
def data_verify(
    ref: str = typer.Argument(..., help="NAME[@VERSION]; default: the latest version."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Recompute every shard's size and SHA-256 against the version's manifest; exit 1 naming
    each missing, extra or altered file."""
    from dcml.data.catalog import resolve_dataset, verify_dataset
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    dv = resolve_dataset(storage, ref)
    _report_verified(dv.ref, verify_dataset(storage, dv), len(dv.manifest.get("files", [])))


@data_app.command("synth")
def data_synth(
    rows: int = typer.Option(..., min=1, help="Rows in all."),
    shards: int = typer.Option(8, min=1, help="Files to write them in."),
    out: str = typer.Option(..., help="Output folder URI; must not exist."),
    fmt: str = typer.Option("parquet", "--format", help="parquet, csv or json (lines)."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same data."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Write synthetic data (numeric + categorical features, binary label, dirt) in parallel."""
    from dcml.cluster import connect
    from dcml.data.synth import write_synth

    cfg = _config(config, set_)
    connect(cfg.cluster)
    files = write_synth(out, rows, shards, fmt, seed, cfg.storage.storage_options)
    typer.echo(f"wrote {rows} rows in {len(files)} {fmt} file(s) under {out}")
    _shutdown()


@app.command()
def gc(
    older_than: str = typer.Option("24h", help="Only what is at least this old (30m, 24h, 7d)."),
    yes: bool = typer.Option(False, "--yes", help="Delete what is listed (default: only list)."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """List what the storage root holds that nothing needs: abandoned writes, checkpoints of runs
    no model came from, dataset versions no run or model names; delete them with --yes."""
    from dcml import gc as collector
    from dcml.storage import Storage

    storage = Storage.from_config(_config(config, set_))
    collector.collect(storage, older_than, yes, typer.echo)


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
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors
        e.show()
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):
        _shutdown()
        return 130
    except USER_ERRORS as e:
        if os.environ.get("DCML_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        _shutdown()
        return 2 if isinstance(e, ConfigError) else 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
