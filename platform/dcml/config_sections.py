"""The sections of the pipeline config (`cluster`, `storage`, `data`, `model`, `train`, `tune`;
`serve` is in dcml.serve_config): every field with its default, its bounds and the description
that the docs and errors show. `dcml.config` puts them together and reads, overrides and
validates a config.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AUTO_METRIC = {"binary": "val_roc_auc", "multiclass": "val_macro_f1", "regression": "val_rmse"}
# The metrics each task's evaluation computes (dcml.train.metrics, and the loss): train.metric
# names the validation one of them (val_*).
TASK_METRICS = {
    "binary": ("loss", "accuracy", "roc_auc", "log_loss", "precision", "recall", "f1"),
    "multiclass": ("loss", "accuracy", "macro_f1", "log_loss"),
    "regression": ("loss", "rmse", "mae", "r2"),
}


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem with its field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterConfig(_Section):
    address: str | None = Field(
        None,
        description="Ray address to join ('auto', 'ray://head:10001'). None: use RAY_ADDRESS "
        "if set, else start a local Ray inside this process (the embedded default).",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs for the embedded local Ray; None uses all cores."
    )
    quiet: bool = Field(
        True,
        description="Hide Ray's own logs; show only dcml's progress (`dcml -v` or DCML_LOG=debug "
        "show them whatever this says).",
    )
    serve_ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="HTTP ingress of a Ray that dcml starts: 'haproxy' (HAProxy routes straight "
        "to the replicas, Serve's throughput-optimized mode) or 'proxy' (Serve's Python proxy). "
        "A joined cluster keeps its own: set RAY_SERVE_ENABLE_HA_PROXY=1 where it starts.",
    )


class StorageConfig(_Section):
    root: str = Field(
        "./dcml-store",
        description="Where datasets, runs and models live: a local path or any fsspec URI "
        "(s3://bucket/prefix, gs://..., memory://...).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the storage root (credentials, endpoint_url, ...).",
    )
    verify: bool = Field(
        False,
        description="Check every file of a dataset version against its SHA-256 before training "
        "on it (presence and sizes are always checked; model weights are always hashed).",
    )


Impute = Literal["mean", "median", "unknown", "drop"]


class GateConfig(_Section):
    repair: Literal["drop", "impute", "none"] = Field(
        "drop",
        description="What the one repair round does with rows that fail a check: drop them, or "
        "impute (non-finite values become 0, the training mean after scaling; values out of range "
        "are clipped), then everything is checked again; none: check only. Rows with a bad label "
        "are always dropped.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_rounds(cls, raw: Any) -> Any:
        """`rounds` (gone: a second repair of the same rows changes nothing) in an older config:
        0 meant check only, which is `repair: none`; any other value meant what no value does."""
        if isinstance(raw, dict) and "rounds" in raw:
            raw = dict(raw)
            rounds = raw.pop("rounds")
            if type(rounds) is not int or rounds < 0:
                raise ValueError(f"rounds (gone; 0 was repair: none): {rounds!r} is not 0 or more")
            if rounds == 0 and raw.setdefault("repair", "none") != "none":
                raise ValueError(f"rounds: 0 (check only) contradicts repair: {raw['repair']}")
        return raw

    min_rows_per_split: int = Field(10, ge=1, description="Fewest rows a split may have.")
    min_class_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Classification: the rarest class's least share per split."
    )
    max_abs_value: float = Field(
        1e6, gt=0, description="Largest absolute value a transformed feature may take."
    )


class AugmentConfig(_Section):
    """Training split only; off by default. Augmented rows keep the id of the row they copy."""

    oversample: bool = Field(
        False, description="Classification: repeat rows of rarer classes up to the largest one."
    )
    noise_std: float = Field(
        0.0, ge=0.0, description="Gaussian noise (in scaled units) for noisy copies; 0 is off."
    )
    noise_copies: int = Field(1, ge=1, description="Noisy copies of each training row.")


class DataConfig(_Section):
    name: str = Field("breast_cancer", description="Dataset name under datasets/ in storage.")
    source: str = Field(
        "bundled:breast_cancer",
        description="Raw data: 'bundled:breast_cancer' (collected into storage as Parquet shards) "
        "or a URI of Parquet/CSV/JSON Lines files: a file, a folder or a glob, on any fsspec "
        "filesystem (local, file://, s3://, gs://, memory://).",
    )
    format: Literal["auto", "parquet", "csv", "json"] = Field(
        "auto", description="Raw file format; auto goes by the file suffix."
    )
    storage_options: dict[str, Any] | None = Field(
        None,
        description="fsspec options for the source (credentials, endpoint_url, ...); "
        "None uses storage.storage_options.",
    )
    raw_shards: int = Field(4, ge=1, description="Shards written when collecting bundled data.")
    label: str = Field("label", description="Label column.")
    id_column: str | None = Field(
        "id",
        description="Row id column, kept through to predictions; None uses a hash of the row.",
    )
    task: Literal["binary", "multiclass", "regression"] = Field(
        "binary", description="Learning task."
    )
    classes: list[int | str | bool] | None = Field(
        None,
        description="Classification labels in order (the last of two is the positive class); "
        "None infers them from the data. A label outside declared classes is bad input.",
    )
    invalid_labels: Literal["error", "drop"] = Field(
        "error",
        description="A label outside `classes` (or a non-finite regression target): stop with "
        "an error naming the file and row, or drop the row and count it.",
    )
    numeric: list[str] | None = Field(
        None, description="Numeric feature columns; None infers every numeric column left."
    )
    categorical: list[str] | None = Field(
        None, description="Categorical feature columns; None infers every string column left."
    )
    impute: Literal["mean", "median", "drop"] = Field(
        "mean", description="Missing numeric values: fill with the training mean/median, or drop."
    )
    impute_columns: dict[str, Impute] = Field(
        default_factory=dict,
        description="Per-column missing-value policy; categorical columns take 'unknown' "
        "(the default: an unknown bucket) or 'drop'.",
    )
    dedupe: Literal["rows", "id", "none"] = Field(
        "rows",
        description="Drop duplicates: rows with equal features and label, or rows with an id "
        "seen before; the first by file and row is kept.",
    )
    clip_quantiles: tuple[float, float] | None = Field(
        (0.001, 0.999),
        description="Clip numeric outliers to these training-split quantiles; None: no clipping.",
    )
    scaling: Literal["standard", "minmax", "none"] = Field(
        "standard", description="Scaling fitted on the training split."
    )
    encoding: Literal["onehot", "ordinal"] = Field(
        "onehot", description="Categorical encoding; both have an unknown bucket."
    )
    max_categories: int = Field(
        64, ge=1, description="Most frequent categories kept per column; the rest are unknown."
    )
    min_category_count: int = Field(
        1, ge=1, description="Categories seen fewer times in training are unknown."
    )
    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "validation": 0.15, "test": 0.15},
        description="Fractions of rows per split, by a seeded hash of the id.",
    )
    gate: GateConfig = Field(default_factory=GateConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if set(self.split) != {"train", "validation", "test"}:
            raise ValueError("split must have exactly the keys train, validation, test")
        if any(v <= 0 for v in self.split.values()) or abs(sum(self.split.values()) - 1) > 1e-6:
            raise ValueError("split fractions must be positive and add up to 1")
        if self.clip_quantiles is not None:
            lo, hi = self.clip_quantiles
            if not 0 <= lo < hi <= 1:
                raise ValueError("clip_quantiles must be [low, high] with 0 <= low < high <= 1")
        if self.task == "regression" and self.classes is not None:
            raise ValueError("classes applies to classification; a regression has none")
        if self.task == "binary" and self.classes is not None and len(self.classes) != 2:
            raise ValueError("a binary task has exactly 2 classes")
        if self.classes is not None and len({str(c).lower() for c in self.classes}) != len(
            self.classes
        ):
            raise ValueError("classes must be distinct")
        return self


class Costs(_Section):
    fp: float = Field(1.0, ge=0, description="The cost of a false positive.")
    fn: float = Field(1.0, ge=0, description="The cost of a false negative.")


class TrainConfig(_Section):
    workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs each worker holds; keep some free for Ray Data."
    )
    use_gpu: bool = Field(False, description="One GPU per worker; fails early if none exist.")
    epochs: int = Field(20, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=1, description="Batch size per worker.")
    lr: float = Field(3e-3, gt=0, description="Learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adamw", description="Optimiser.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum; 0: plain gradient descent.")
    weight_decay: float = Field(1e-4, ge=0, description="L2 regularisation (weight decay).")
    l1: float = Field(0.0, ge=0, description="L1 regularisation: this times the sum of |weights|.")
    schedule: Literal["none", "cosine", "step", "plateau"] = Field(
        "none", description="Learning-rate schedule over the epochs."
    )
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up of the learning rate.")
    step_size: int = Field(10, ge=1, description="schedule=step: epochs between decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="schedule=step/plateau: decay factor.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this.")
    grad_accum: int = Field(1, ge=1, description="Mini-batches per optimiser step.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16: autocast (CPU and GPU); fp16: autocast with a grad scaler (GPU)."
    )
    patience: int | None = Field(
        None, ge=1, description="Early stopping: epochs without improvement of the metric."
    )
    min_delta: float = Field(0.0, ge=0, description="Early stopping: the least improvement.")
    target: float | None = Field(None, description="Stop once the metric reaches this value.")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every N epochs.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept per run: the best K by the metric."
    )
    max_failures: int = Field(2, ge=0, description="Worker failures to recover from.")
    metric: str = Field(
        "auto",
        description="Validation metric that picks the best epoch; auto: val_roc_auc (binary), "
        "val_macro_f1 (multiclass), val_rmse (regression).",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether a higher metric is better; auto goes by the metric's name."
    )
    loss: Literal["auto", "mse", "huber"] = Field(
        "auto", description="Regression loss (auto: mse); classification uses cross-entropy."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="Classification: weight the loss by inverse class frequency."
    )
    cache: Literal["device", "memory", "none"] = Field(
        "device",
        description="Each worker reads its shard once and keeps it on the training device "
        "(device; host memory if it does not fit), in host memory (memory), or streams it from "
        "Ray Data every epoch (none).",
    )
    shuffle_buffer: int = Field(
        10_000, ge=1, description="cache=none: rows in Ray Data's local shuffle buffer."
    )
    init_from: str | None = Field(
        None,
        description="Fine-tune: start from a registered model's weights (NAME@VERSION|ALIAS); "
        "tensors whose name and shape match are loaded.",
    )
    freeze_layers: int = Field(
        0, ge=0, description="Fine-tune: hidden layers, from the input, whose weights stay fixed."
    )
    threshold: Annotated[float, Field(gt=0, lt=1)] | Literal["max_f1", "youden", "cost"] = Field(
        0.5,
        description="Binary: the probability from which the answer is the positive class; a "
        "number, or chosen on the validation split at registration: max_f1 (the best F1), youden "
        "(the largest TPR - FPR), cost (the least costs.fp * FP + costs.fn * FN).",
    )
    costs: Costs = Field(
        default_factory=lambda: Costs(), description="threshold: cost: what each error costs."
    )

    @model_validator(mode="after")
    def _check_fine_tune(self) -> TrainConfig:
        if self.freeze_layers and not self.init_from:
            raise ValueError("freeze_layers needs init_from (a registered model to start from)")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 needs a GPU (use_gpu: true); on CPU use bf16 or fp32")
        return self


SPACE_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


class TuneConfig(_Section):
    enabled: bool = Field(True, description="Run the sweep in `dcml run`.")
    space: dict[str, dict[str, list[Any]]] | None = Field(
        None,
        description="Search space: config field by dotted path -> one of {loguniform: [low, "
        "high]}, {uniform: [low, high]}, {randint: [low, high]} (both ends included), "
        "{choice: [values]}, {grid: [values]} (every value, crossed with the rest). Default: "
        "the model family's (mlp: train.lr and model.depth; gbdt: model.gbdt.eta and max_depth).",
    )
    searcher: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="random: sample the space (grid entries crossed); grid: every combination "
        "(choice and grid entries only); optuna: TPE Bayesian search (the `tune` extra).",
    )
    scheduler: Literal["asha", "none", "pbt"] = Field(
        "asha",
        description="asha: stop bad trials early on per-epoch metrics; none: run all; pbt: "
        "population-based training (trials copy better trials' weights and perturb train.*).",
    )
    perturbation_interval: int = Field(
        2, ge=1, description="PBT: epochs between exploiting/perturbing trials."
    )
    num_samples: int = Field(
        4, ge=1, description="Trials (random, optuna); with grid entries: samples per grid point."
    )
    epochs: int = Field(12, ge=1, description="Max epochs per trial (ASHA's max_t).")
    grace_period: int = Field(3, ge=1, description="ASHA: epochs before a trial may be stopped.")
    reduction_factor: int = Field(
        2, ge=2, description="ASHA: 1/reduction_factor of trials go on at each rung."
    )
    workers_per_trial: int = Field(
        1, ge=1, description="Ray Train workers in each trial; > 1 trains each trial with DDP."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; None: as many as max_cpus/max_gpus allow."
    )
    max_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs the whole sweep may hold (its share of a shared cluster); None: the "
        "cluster's CPUs, less one for Ray Data when there are more than two.",
    )
    max_gpus: float | None = Field(
        None, ge=0, description="GPUs the sweep may hold (train.use_gpu); None: the cluster's."
    )

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        if self.space is None:  # the family's default (PipelineConfig fills it in)
            return self
        if not self.space:
            raise ValueError("space needs at least one field to search")
        for path, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                raise ValueError(
                    f"space.{path}: give exactly one of {', '.join(SPACE_KINDS)}, e.g. "
                    "{loguniform: [0.0001, 0.01]}"
                )
            kind, values = next(iter(spec.items()))
            if not values:
                raise ValueError(f"space.{path}: {kind} needs values")
            if kind in ("loguniform", "uniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                    raise ValueError(f"space.{path}: {kind} takes [low, high]")
                if values[0] >= values[1]:
                    raise ValueError(f"space.{path}: {kind} low must be below high")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"space.{path}: loguniform needs low > 0")
                if kind == "randint" and not all(isinstance(v, int) for v in values):
                    raise ValueError(f"space.{path}: randint takes integers")
            if self.searcher == "grid" and kind not in ("choice", "grid"):
                raise ValueError(
                    f"space.{path}: searcher grid needs choice or grid values, not {kind}"
                )
            if self.searcher == "optuna" and kind == "grid":
                raise ValueError(f"space.{path}: searcher optuna cannot take grid; use choice")
        return self
