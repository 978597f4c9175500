"""`dcml models`, `dcml data` and `dcml gc`: what the storage root holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dcml.cli_common import ConfigOpt, SetOpt, config_of

models_app = typer.Typer(no_args_is_help=True, help="Registered model versions and aliases.")
data_app = typer.Typer(no_args_is_help=True, help="Stored dataset versions.")


@models_app.command("list")
def models_list(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt):
    """Registered models, their versions and aliases."""
    from dcml import registry
    from dcml.storage import Storage

    storage = Storage.from_config(config_of(config, set_))
    for name, versions in registry.list_models(storage).items():
        aliases = registry.aliases(storage, name)
        shown = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items()))
        typer.echo(f"{name}: versions {versions}" + (f"; aliases {shown}" if shown else ""))


@models_app.command("show")
def models_show(model: str, config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt):
    """One model version's metadata (without the preprocessor state)."""
    from dcml import registry
    from dcml.storage import Storage

    storage = Storage.from_config(config_of(config, set_))
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

    storage = Storage.from_config(config_of(config, set_))
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
    from dcml import registry, tracking
    from dcml.storage import Storage

    cfg = config_of(config, set_)
    storage = Storage.from_config(cfg)
    before = registry.set_alias(storage, name, alias, version, force=force)
    typer.echo(f"{name}@{alias} -> {version}" + (f" (was {before})" if before else ""))
    tracking.log_aliases(cfg, storage, name, typer.echo)


@models_app.command("rollback")
def models_rollback(
    name: str,
    alias: str = typer.Option("production"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Point an alias back at the version it had before its latest promotion."""
    from dcml import registry, tracking
    from dcml.storage import Storage

    cfg = config_of(config, set_)
    storage = Storage.from_config(cfg)
    version = registry.rollback(storage, name, alias)
    typer.echo(f"{name}@{alias} -> {version} (rolled back)")
    tracking.log_aliases(cfg, storage, name, typer.echo)


@data_app.command("list")
def data_list(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt):
    """Committed dataset versions, oldest first."""
    import time

    from dcml.data.catalog import list_versions
    from dcml.layout import dataset_folder
    from dcml.storage import Storage

    storage = Storage.from_config(config_of(config, set_))
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

    dv = resolve_dataset(Storage.from_config(config_of(config, set_)), ref)
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

    storage = Storage.from_config(config_of(config, set_))
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
    from dcml.cluster import connect, shutdown
    from dcml.data.synth import write_synth

    cfg = config_of(config, set_)
    connect(cfg.cluster)
    files = write_synth(out, rows, shards, fmt, seed, cfg.storage.storage_options)
    typer.echo(f"wrote {rows} rows in {len(files)} {fmt} file(s) under {out}")
    shutdown()


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

    storage = Storage.from_config(config_of(config, set_))
    collector.collect(storage, older_than, yes, typer.echo)
