"""What training data looked like, kept small enough to store with the preprocessor state and a
model version, so that `dcml monitor` compares served traffic with it without re-reading data.

A number's distribution is its quantiles on a grid of 101 probabilities with the exact share of
values at or below each (`points`, `cdf`: ties make the share differ from the grid), from the
quantile sample preprocessing already takes; a category's is the share of each of its most
frequent values, over the whole training split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from dcml.data.columns import class_key

GRID = np.linspace(0.0, 1.0, 101)
TOP_CATEGORIES = 50  # categories kept by share; the rest are "other"


def distribution(values: np.ndarray) -> dict[str, list[float]]:
    """`points` (ascending, distinct) and `cdf` (share of values <= each point) of the finite
    values; empty lists when there are none."""
    v = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if not len(v):
        return {"points": [], "cdf": []}
    points = np.unique(np.quantile(v, GRID))
    cdf = np.searchsorted(v, points, side="right") / len(v)
    return {"points": points.tolist(), "cdf": cdf.tolist()}


def numeric_reference(values: np.ndarray) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    missing = float(np.isnan(v).mean()) if len(v) else 0.0
    return {**distribution(v), "missing": missing, "rows": int(len(v))}


def category_reference(counts: Counter, nulls: int, known: list[str]) -> dict[str, Any]:
    """Shares of the most frequent values among the non-missing ones; `unknown`: the share of
    values outside `known` (the categories the model has, the rest going to its unknown bucket)."""
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CATEGORIES]
    known_set = set(known)
    outside = sum(n for v, n in counts.items() if v not in known_set)
    return {
        "frequencies": {v: n / total for v, n in ranked} if total else {},
        "unknown": outside / total if total else 0.0,
        "missing": nulls / (total + nulls) if total + nulls else 0.0,
        "rows": int(total + nulls),
    }


def prediction_reference(task: str, outputs: np.ndarray, classes: list | None) -> dict[str, Any]:
    """What a model version predicted on its test split: P(positive) for binary, the predicted
    classes' shares for multiclass, values for regression."""
    if task == "multiclass":
        counts = np.bincount(np.argmax(outputs, axis=1), minlength=len(classes or []))
        shares = counts / max(counts.sum(), 1)
        frequencies = {class_key(c): float(s) for c, s in zip(classes, shares)}
        return {"kind": "class", "frequencies": frequencies, "rows": int(len(outputs))}
    kind = "probability" if task == "binary" else "value"
    return {"kind": kind, **distribution(outputs.reshape(-1)), "rows": int(len(outputs))}


def decile_bins(reference: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges near the reference's deciles and each bin's reference share; bins are
    (-inf, e1], (e1, e2], ..., (ek, inf)."""
    points, cdf = np.asarray(reference["points"]), np.asarray(reference["cdf"])
    at = sorted({min(int(np.searchsorted(cdf, q)), len(points) - 1) for q in np.arange(1, 10) / 10})
    at = [i for i in at if cdf[i] < 1.0] or [len(points) - 1]
    edges = points[at]
    shares = np.diff(np.concatenate([[0.0], cdf[at], [1.0]]))
    return edges, shares
