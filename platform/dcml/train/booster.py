"""A stored booster (model.family: gbdt) read back: behind the MLP's interface for everything
that scores a model, and its gain importance. No training here, and no Ray."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

try:
    import xgboost as xgb
except ImportError:  # the family is refused before training starts (require_xgboost)
    xgb = None


def require_xgboost(gpu: bool = False) -> None:
    if xgb is None:
        raise RuntimeError(
            "model.family=gbdt needs XGBoost: pip install 'dcml[gbdt]' (or 'dcml[gbdt-cpu]', "
            "without the CUDA libraries)"
        )
    if gpu and not xgb.build_info().get("USE_CUDA"):
        raise RuntimeError(
            "train.use_gpu with model.family=gbdt needs XGBoost built with CUDA: pip install "
            "'dcml[gbdt]' (the xgboost package, not xgboost-cpu) on the GPU nodes"
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
        # predicts on the CPU whatever it was trained on: trees score a batch of tabular rows in
        # microseconds per row, and the CPU build of XGBoost (xgboost-cpu) has no CUDA at all
        # as many threads as torch may use here (a Serve replica or batch worker sets that)
        self.booster.set_param({"nthread": torch.get_num_threads(), "device": "cpu"})
        self.n_outputs = spec["n_outputs"]
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Margins of the rows of `x`, on the device `x` is on (computed on the CPU)."""
        if len(x) == 0:
            return torch.empty((0, self.n_outputs), dtype=torch.float32, device=x.device)
        margins = self.booster.inplace_predict(x.detach().cpu().numpy(), predict_type="margin")
        out = torch.from_numpy(np.asarray(margins, dtype=np.float32)).reshape(len(x), -1)
        return out.to(x.device)
