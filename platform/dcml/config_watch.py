"""The sections for what watches a model after training: experiment tracking (MLflow) and the
drift monitor's thresholds."""

from __future__ import annotations

from pydantic import Field

from dcml.config_sections import _Section


class TrackingConfig(_Section):
    """A mirror of runs, sweeps and registrations in MLflow; dcml's registry stays the source
    of truth, and an unreachable tracking server never fails a run."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (sqlite:///mlflow.db, http://host:5000); None: off. "
        "Needs `pip install 'dcml[mlflow]'`.",
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the `name`.")


class MonitorConfig(_Section):
    """`dcml monitor`: a value above its threshold is flagged and the command exits 3."""

    since: str = Field("7d", description="Default window of logged traffic (30m, 24h, 7d, a date).")
    min_records: int = Field(
        100, ge=1, description="Fewer logged records than this: reported, not judged."
    )
    psi: float = Field(0.2, gt=0, description="Population stability index of a feature.")
    ks: float = Field(0.2, gt=0, le=1, description="Kolmogorov-Smirnov statistic of a number.")
    prediction_psi: float = Field(0.2, gt=0, description="PSI of the predictions' distribution.")
    unknown_rate: float = Field(
        0.05, ge=0, le=1, description="Share of records with a category unseen in training."
    )
    missing_rate: float = Field(
        0.05, ge=0, le=1, description="Rise of a column's missing share over training's."
    )
    metric_drop: float = Field(
        0.05, ge=0, description="With --labels: fall of the live metric below the test metric."
    )
