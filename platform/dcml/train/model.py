"""The MLP, built from a plain dict spec that is stored next to its weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def model_spec(model_cfg, n_features: int, n_outputs: int = 1) -> dict[str, Any]:
    widths = model_cfg.width if isinstance(model_cfg.width, list) else [model_cfg.width]
    return {
        "kind": "mlp",
        "n_features": n_features,
        "n_outputs": n_outputs,
        "depth": model_cfg.depth,
        "widths": widths * model_cfg.depth if len(widths) == 1 else list(widths),
        "activation": model_cfg.activation,
        "dropout": model_cfg.dropout,
        "norm": model_cfg.norm,
        "residual": model_cfg.residual,
    }


class Block(nn.Module):
    """Linear, norm, activation, dropout; plus a skip connection if asked and shapes match."""

    def __init__(self, width_in: int, width: int, spec: dict[str, Any]):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(width_in, width)]
        if spec.get("norm") == "batch":
            layers.append(nn.BatchNorm1d(width))
        elif spec.get("norm") == "layer":
            layers.append(nn.LayerNorm(width))
        layers.append(ACTIVATIONS[spec["activation"]]())
        if spec["dropout"] > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        self.layers = nn.Sequential(*layers)
        self.residual = bool(spec.get("residual")) and width_in == width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


def build_model(spec: dict[str, Any]) -> nn.Sequential:
    """depth 0 is a single linear layer: sigmoid(θᵀx), i.e. logistic regression."""
    widths = spec["widths"] if "widths" in spec else [spec["width"]] * spec["depth"]  # older: one
    blocks: list[nn.Module] = []
    width_in = spec["n_features"]
    for width in widths[: spec["depth"]]:
        blocks.append(Block(width_in, width, spec))
        width_in = width
    blocks.append(nn.Linear(width_in, spec["n_outputs"]))
    return nn.Sequential(*blocks)


def n_outputs(task: str, classes: list | None) -> int:
    """The model's outputs: one per class (multiclass), else one (a logit or a value)."""
    return len(classes) if task == "multiclass" else 1


def model_from_bytes(spec: dict[str, Any], data: bytes) -> nn.Module:
    """A stored model, either family, without pickle: an MLP from safetensors, a booster from
    XGBoost's UBJSON (behind the same interface: features in, logits or values out)."""
    if spec.get("kind") == "gbdt":
        from dcml.train.booster import BoosterModel

        return BoosterModel(data, spec)
    from safetensors.torch import load

    model = build_model(spec)
    model.load_state_dict(load(data))
    return model


def load_model(storage, folder: str, spec: dict[str, Any]) -> nn.Module:
    """The model of a checkpoint or model version folder."""
    from dcml.layout import read_weights

    return model_from_bytes(spec, read_weights(storage, folder, spec))
