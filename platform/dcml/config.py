"""The pipeline config: one YAML file, validated by pydantic, with defaults and dotted overrides.

Every problem in a config is reported at once, each naming the field and, where it helps, what is
allowed there (litgpt's `validate_args` style).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from dcml.config_model import DEFAULT_SPACE, ModelConfig, sweep_families
from dcml.config_sections import (
    AUTO_METRIC,
    TASK_METRICS,
    ClusterConfig,
    ConfigError,
    DataConfig,
    StorageConfig,
    TrainConfig,
    TuneConfig,
    _Section,
)
from dcml.config_watch import MonitorConfig, TrackingConfig
from dcml.direction import mode_of
from dcml.serve_config import TOKEN_SOURCES, PredictConfig, ServeConfig

__all__ = ["ConfigError", "PipelineConfig", "load_config", "parse_config"]


class PipelineConfig(_Section):
    name: str = Field("breast_cancer", description="Model name in the registry.")
    seed: int = Field(0, description="Drives splits, shuffles and initialisation.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _resolve_auto(self) -> PipelineConfig:
        """Fill the fields whose default depends on the task."""
        if self.tune.space is None:
            self.tune.space = copy.deepcopy(DEFAULT_SPACE[self.model.family])
        if self.train.metric == "auto":
            self.train.metric = AUTO_METRIC[self.data.task]
        allowed = [f"val_{m}" for m in TASK_METRICS[self.data.task]]
        if self.train.metric not in allowed:
            raise ValueError(
                f"train.metric: {self.train.metric!r} is not a validation metric of a "
                f"{self.data.task} model; one of {', '.join(allowed)}"
            )
        if self.train.mode == "auto":
            self.train.mode = mode_of(self.train.metric)
        families = sweep_families(self.tune.space, self.model.family)
        wrong = [f for f in families if f not in ("mlp", "gbdt")]
        if wrong:
            raise ValueError(f"tune.space.model.family: {wrong[0]!r} is not a family (mlp, gbdt)")
        if self.train.init_from and "gbdt" in families:
            raise ValueError(
                "train.init_from: fine-tuning needs model.family=mlp (this config trains gbdt "
                "trees, or its sweep may)"
            )
        if self.tune.scheduler == "pbt" and "gbdt" in families:
            raise ValueError(
                "tune.scheduler: PBT needs model.family=mlp (it copies an MLP's weights between "
                "trials)"
            )
        for path in self.tune.space:
            problem = _field_problem(path)
            if problem:
                raise ValueError(f"tune.space.{path}: {problem}")
            if self.tune.scheduler == "pbt" and not path.startswith("train."):
                raise ValueError(
                    f"tune.space.{path}: PBT copies weights between trials, so it can vary "
                    "train.* fields only (the model's shape must stay the same)"
                )
        if self.tune.scheduler == "pbt" and self.tune.workers_per_trial != 1:
            raise ValueError("tune.workers_per_trial: PBT trains each trial in one process (1)")
        if self.tune.scheduler == "pbt" and self.train.cache == "none":
            raise ValueError("train.cache: PBT trials cache their split (memory or device)")
        if self.train.freeze_layers > self.model.depth:
            raise ValueError(
                f"train.freeze_layers={self.train.freeze_layers} but model.depth is "
                f"{self.model.depth}: only hidden layers can be frozen"
            )
        return self


def _field_problem(path: str) -> str | None:
    """Why a dotted path is not a field that a sweep can set (None if it is)."""
    model: type[BaseModel] = PipelineConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            hint = difflib.get_close_matches(part, list(model.model_fields), n=1)
            where = ".".join(parts[:i]) or "the config"
            return f"{where} has no field {part!r}" + (
                f" (did you mean {hint[0]!r}?)" if hint else ""
            )
        ann = model.model_fields[part].annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return f"{'.'.join(parts[: i + 1])} is a field, not a section"
            model = ann
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            return "is a section; name a field in it"
    if parts[0] in ("storage", "cluster", "serve", "tune", "data"):
        return "a sweep varies the model and its training (model.*, train.*, seed)"
    if path == "train.epochs":
        return "a trial's epoch budget is tune.epochs (ASHA stops trials early by epoch)"
    if path == "model.gbdt.checkpoint_every":
        return "a sweep cuts each trial's rounds into tune.epochs reports itself"
    return None


# Fields that hold credentials: never stored with runs, models or datasets.
SECRETS = (("storage", "storage_options"), ("data", "storage_options"), ("serve", "auth_token"))


def public_dump(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as JSON to store with a run or model, without credentials."""
    raw = cfg.model_dump(mode="json")
    for section, name in SECRETS:
        raw[section].pop(name, None)
    if uri := raw["tracking"]["mlflow_uri"]:  # http://user:password@host: keep only the host
        raw["tracking"]["mlflow_uri"] = re.sub(r"^([a-z+]+://)[^/@]*@", r"\1", uri)
    return raw


def with_secrets(raw: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """A stored config with the credentials of `cfg` (the one the user runs with) put back, and
    its token source: the stored one may name another (a resume with auth_token where the run
    had auth_token_env)."""
    raw = copy.deepcopy(raw)
    sources = [("serve", n) for n in TOKEN_SOURCES if n in ServeConfig.model_fields]
    for section, name in (*SECRETS, *sources):
        raw.setdefault(section, {})[name] = getattr(getattr(cfg, section), name)
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Read a YAML config (or the defaults when path is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return with_overrides(raw, overrides, str(path) if path else "config")


def with_overrides(
    raw: dict[str, Any], overrides: list[str] | None, source: str = "config"
) -> PipelineConfig:
    """A raw config (as read from YAML or stored with a run) plus `a.b=value` overrides."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        _apply_override(raw, item)
    return parse_config(raw, source)


def parse_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        msg = f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        raise ConfigError(msg) from None


def with_values(
    cfg: PipelineConfig, values: dict[str, Any], source: str = "config"
) -> PipelineConfig:
    """A copy of cfg with dotted-path fields set (`{"train.lr": 0.01}`), validated like any
    config."""
    raw = cfg.model_dump()
    for path, value in values.items():
        _set(raw, path, value)
    return parse_config(raw, source)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    _set(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a raw config: the one setter of overrides and sweep parameters."""
    *sections, leaf = path.split(".")
    node = raw
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {part!r} is not a section")
    node[leaf] = value


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, to list its allowed fields."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


# what XGBoost's and scikit-learn's users type for a model.gbdt field
ALIASES = {
    "learning_rate": "eta",
    "n_estimators": "rounds",
    "num_boost_round": "rounds",
    "lambda": "reg_lambda",
    "alpha": "reg_alpha",
    "early_stopping": "early_stopping_rounds",
}


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = sorted(owner.model_fields) if owner else []
        hint = [ALIASES[loc[-1]]] if loc[-1] in ALIASES else None
        hint = hint or difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        msg = f"{where}: unknown field"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        return msg + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if loc else msg
