"""What every `dcml` verb shares: the config argument and options, and loading the config."""

from __future__ import annotations

from pathlib import Path

import typer

from dcml.config import PipelineConfig, load_config

ConfigArg = typer.Argument(None, help="Pipeline config (YAML); defaults apply where omitted.")
ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline config (YAML).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: section.field=value.")


def config_of(path: Path | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(path, overrides or [])
