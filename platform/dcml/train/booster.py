"""A stored booster (model.family: gbdt) read back: behind the MLP's interface for everything
that scores a model, and its gain importance. No training here, and no Ray."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import xgboost as xgb
except ImportError:  # the family is refused before training starts (require_xgboost)
    xgb = None


def require_xgboost() -> None:
    if xgb is None:
        raise RuntimeError(
            "model.family=gbdt needs XGBoost: pip install 'dcml[gbdt]' (or 'dcml[gbdt-cpu]', "
            "without the CUDA libraries)"
        )


def gain_importance(booster_bytes: bytes, features: list[str]) -> dict[str, float]:
    """Each raw input's share of the trees' total gain (a categorical column's one-hot
    features summed)."""
    require_xgboost()
    booster = xgb.Booster()
    booster.load_model(bytearray(booster_bytes))
    gains = booster.get_score(importance_type="total_gain")  # {"f<j>": gain}
    by_column: dict[str, float] = {}
    for j, feature in enumerate(features):
        column = feature.split("=", 1)[0]
        by_column[column] = by_column.get(column, 0.0) + float(gains.get(f"f{j}", 0.0))
    total = sum(by_column.values()) or 1.0
    return {column: gain / total for column, gain in by_column.items()}


class BoosterModel(torch.nn.Module):
    """A booster behind the MLP's interface: features in, raw outputs (margins: an MLP's
    logits) out, (rows, outputs) float32. Everything that scores a model (the Predictor,
    evaluation, permutation importance) takes either family."""

    def __init__(self, data: bytes, spec: dict[str, Any]):
        super().__init__()
        require_xgboost()
        self.booster = xgb.Booster()
        self.booster.load_model(bytearray(data))
        self.booster.set_param({"nthread": max(1, min(4, os.cpu_count() or 1))})
        self.n_outputs = spec["n_outputs"]
        self.eval()

    def to(self, device, *args, **kwargs):
        device = torch.device(device)
        self.booster.set_param({"device": "cuda" if device.type == "cuda" else "cpu"})
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = len(x)
        if rows == 0:
            return torch.empty((0, self.n_outputs), dtype=torch.float32)
        data = x.detach()
        data = data if data.device.type == "cuda" else data.numpy()  # CUDA: no copy to host
        margins = self.booster.inplace_predict(data, predict_type="margin")
        out = torch.as_tensor(margins, device=x.device)  # CUDA: a CuPy array, taken as it is
        return out.to(torch.float32).reshape(rows, -1)
