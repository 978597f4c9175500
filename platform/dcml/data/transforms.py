"""Fitted transforms as plain JSON, and the one function that applies them to a batch.

The same `Preprocessor.transform` runs in preprocessing (on Ray Data batches), in training's
evaluation, in batch inference and inside Serve replicas, so training and serving cannot drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STATE_VERSION = 1


@dataclass(frozen=True)
class Preprocessor:
    features: list[str]
    fill: dict[str, float]  # imputation value per feature (the training mean)
    center: dict[str, float]
    scale: dict[str, float]
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> Preprocessor:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"preprocessor state version {state.get('version')!r} is not supported"
            )
        return cls(
            features=list(state["features"]),
            fill={k: float(v) for k, v in state["fill"].items()},
            center={k: float(v) for k, v in state["center"].items()},
            scale={k: float(v) for k, v in state["scale"].items()},
        )

    def transform(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Raw feature columns (NumPy or Arrow arrays, by name) -> float32 (rows, features)."""
        first = columns[self.features[0]]
        out = np.empty((len(first), len(self.features)), dtype=np.float32)
        for j, name in enumerate(self.features):
            values = _as_float(columns[name])
            values = np.where(np.isnan(values), self.fill[name], values)
            out[:, j] = (values - self.center[name]) / self.scale[name]
        return out


def _as_float(values: Any) -> np.ndarray:
    if hasattr(values, "to_numpy"):  # pyarrow (chunked) arrays; nulls become NaN
        values = values.to_numpy(zero_copy_only=False) if _is_arrow(values) else values.to_numpy()
    return np.asarray(values, dtype=np.float64)


def _is_arrow(values: Any) -> bool:
    return type(values).__module__.startswith("pyarrow")


def fit_preprocessor(train_ds, features: list[str], scaling: str) -> Preprocessor:
    """Fit imputation and scaling over the whole training split with Ray Data aggregations."""
    from ray.data.aggregate import Mean, Std

    def finite_only(batch: pa.Table) -> pa.Table:
        # Statistics over finite values only: an infinity must not poison the mean. The rows
        # themselves stay, and the gate flags (and repairs) what is still non-finite afterwards.
        cols = {}
        for c in features:
            v = batch.column(c)
            cols[c] = pc.if_else(pc.is_finite(v), v, pa.scalar(None, v.type))
        return pa.table(cols)

    train_ds = train_ds.map_batches(finite_only, batch_format="pyarrow")
    aggs = [Mean(c, alias_name=f"mean:{c}") for c in features]
    if scaling == "standard":
        aggs += [Std(c, ddof=0, alias_name=f"std:{c}") for c in features]
    stats = train_ds.aggregate(*aggs)
    fill, center, scale = {}, {}, {}
    for c in features:
        mean = stats[f"mean:{c}"]
        if mean is None or not np.isfinite(mean):
            raise ValueError(f"column {c!r} has no finite values in the training split")
        fill[c] = float(mean)
        if scaling == "standard":
            std = stats[f"std:{c}"]
            center[c] = float(mean)
            # A constant column would divide by zero; leave it centred but unscaled.
            scale[c] = float(std) if std and np.isfinite(std) and std > 0 else 1.0
        else:
            center[c], scale[c] = 0.0, 1.0
    return Preprocessor(features=list(features), fill=fill, center=center, scale=scale)
