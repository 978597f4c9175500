"""Which value of a metric is better: the one answer that checkpoint choice, sweeps, the
pipeline's pick and the promotion gate all use."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MINIMISED = {"loss", "log_loss", "rmse", "mae", "mse"}  # lower is better; any other: higher


def mode_of(metric: str) -> str:
    """'min' or 'max': whether a lower or a higher value of a metric (val_*, test_*) is better."""
    name = metric.removeprefix("val_").removeprefix("test_")
    return "min" if name in MINIMISED else "max"


def better(value: float, than: float, mode: str) -> bool:
    """Whether `value` is strictly better than `than` (neither may be NaN)."""
    return value > than if mode == "max" else value < than


def best_by(items: Iterable[tuple[Any, ...]], mode: str) -> tuple[Any, ...]:
    """The best of (value, tiebreak, ...) tuples: best value, then the larger tiebreak (a later
    epoch); NaN values never win."""
    sign = 1 if mode == "max" else -1
    usable = [i for i in items if not math.isnan(i[0])]
    return max(usable or list(items), key=lambda i: (sign * i[0], i[1]))
