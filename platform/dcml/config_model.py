"""The `model` section: its family, the MLP's shape, and `model.gbdt`, gradient-boosted trees
(XGBoost through Ray Train's XGBoostTrainer). The gbdt names follow XGBoost's parameters (its
scikit-learn names for the two regularisation terms, since `lambda` is a Python keyword)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dcml.config_sections import _Section

# train.* fields that only the MLP's loop reads: a gbdt run's report and docs leave them out
MLP_TRAIN_FIELDS = (
    "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "l1", "schedule",
    "warmup_epochs", "step_size", "gamma", "grad_clip", "grad_accum", "precision", "patience",
    "checkpoint_every", "shuffle_buffer", "init_from", "freeze_layers",
)  # fmt: skip


class GbdtConfig(_Section):
    rounds: int = Field(
        300, ge=1, le=100_000, description="Boosting rounds at most; early stopping can end sooner."
    )
    eta: float = Field(0.1, gt=0, le=1, description="Learning rate (shrinkage of each tree).")
    max_depth: int = Field(6, ge=1, le=32, description="Depth of each tree.")
    min_child_weight: float = Field(
        1.0, ge=0, description="Least sum of Hessian (for squared error: rows) in a leaf."
    )
    subsample: float = Field(1.0, gt=0, le=1, description="Share of rows each tree samples.")
    colsample_bytree: float = Field(
        1.0, gt=0, le=1, description="Share of features each tree samples."
    )
    reg_lambda: float = Field(1.0, ge=0, description="L2 regularisation of leaf weights (lambda).")
    reg_alpha: float = Field(0.0, ge=0, description="L1 regularisation of leaf weights (alpha).")
    gamma: float = Field(0.0, ge=0, description="Least loss reduction to split a leaf.")
    max_bin: int = Field(256, ge=2, le=65_536, description="Histogram bins per feature.")
    tree_method: Literal["hist", "approx"] = Field("hist", description="How splits are found.")
    early_stopping_rounds: int = Field(
        30,
        ge=0,
        description="Stop after this many rounds without improvement on the validation split "
        "(0: never); the model kept ends at its best round.",
    )
    stop_on: Literal["loss", "metric"] = Field(
        "loss",
        description="What early stopping and the kept round go by: loss (val_loss, XGBoost's "
        "convention: smooth where accuracy, F1 or ROC AUC tie or jump on a small validation "
        "split) or metric (train.metric, ties broken by val_loss; train.target applies).",
    )
    checkpoint_every: int = Field(
        10,
        ge=1,
        description="Rounds between checkpoints (and reports to Ray); in a sweep, the rounds "
        "are cut into tune.epochs reports instead, so ASHA's rungs mean the same share of the "
        "budget for both families.",
    )


class ModelConfig(_Section):
    family: Literal["mlp", "gbdt"] = Field(
        "mlp",
        description="mlp: a neural network (PyTorch DDP); gbdt: gradient-boosted trees "
        "(XGBoost, model.gbdt.*).",
    )
    gbdt: GbdtConfig = Field(default_factory=lambda: GbdtConfig())
    depth: int = Field(2, ge=0, le=64, description="Hidden layers; 0 is logistic regression.")
    width: int | list[int] = Field(
        64, description="Units per hidden layer: one number, or one per layer (depth entries)."
    )
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="Hidden activation.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    norm: Literal["none", "batch", "layer"] = Field(
        "none", description="Normalisation in each hidden layer (before the activation)."
    )
    residual: bool = Field(
        False,
        description="Skip connections around hidden layers whose input and output widths match.",
    )

    @model_validator(mode="after")
    def _check_width(self) -> ModelConfig:
        widths = self.width if isinstance(self.width, list) else [self.width]
        if any(w < 1 for w in widths):
            raise ValueError("width must be >= 1")
        if isinstance(self.width, list) and len(self.width) != self.depth:
            raise ValueError(f"width lists {len(self.width)} layers but depth is {self.depth}")
        return self


MLP_MODEL_FIELDS = ("depth", "width", "activation", "dropout", "norm", "residual")

# tune.space when the config names none: what each family is usually swept over
DEFAULT_SPACE = {
    "mlp": {"train.lr": {"loguniform": [1e-4, 3e-2]}, "model.depth": {"choice": [1, 2, 3]}},
    "gbdt": {
        "model.gbdt.eta": {"loguniform": [0.02, 0.3]},
        "model.gbdt.max_depth": {"choice": [3, 6, 8]},
    },
}


def reads(path: str, family: str) -> bool:
    """Whether a model of `family` reads the config field at dotted `path` (a sweep's table
    shows the others as "-")."""
    section, _, name = path.partition(".")
    if path.startswith("model.gbdt."):
        return family == "gbdt"
    if (section, name) in [("model", f) for f in MLP_MODEL_FIELDS] + [
        ("train", f) for f in MLP_TRAIN_FIELDS
    ]:
        return family == "mlp"
    return True


def sweep_families(space: dict[str, Any], family: str) -> list[str]:
    """The model families a sweep's trials can have."""
    spec = space.get("model.family")
    return sorted(set(next(iter(spec.values())))) if spec else [family]


def sweep_problem(space: dict[str, Any], family: str) -> str | None:
    """Why a sweep of one family would be pointless: if its trials read none of the searched
    fields, they would all be the same trial (None if they read one)."""
    if "model.family" in space:  # a sweep over families: a family's one config is a trial
        return None
    fields = list(space)
    for f in sweep_families(space, family):
        if fields and not any(reads(p, f) for p in fields):
            hint = ", ".join(DEFAULT_SPACE[f])
            return (
                f"tune.space: a {f} trial reads none of {', '.join(fields)}, so its trials would "
                f"all be the same; search fields it reads (e.g. {hint}), or leave tune.space out "
                "for the family's default"
            )
    return None


def family_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config's model and train sections with only the fields its family reads (what
    a run's report shows)."""
    config = dict(config)
    model = dict(config.get("model") or {})
    gbdt = model.pop("gbdt", None)
    if model.get("family") == "gbdt" and isinstance(gbdt, dict):
        model = {"family": "gbdt", **gbdt}
        train = (config.get("train") or {}).items()
        config["train"] = {k: v for k, v in train if reads(f"train.{k}", "gbdt")}
    if "model" in config:
        config["model"] = model
    return config
