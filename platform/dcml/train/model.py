"""The MLP, built from a plain dict spec that is stored next to its weights."""

from __future__ import annotations

from typing import Any

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def model_spec(model_cfg, n_features: int, n_outputs: int = 1) -> dict[str, Any]:
    return {
        "kind": "mlp",
        "n_features": n_features,
        "n_outputs": n_outputs,
        "depth": model_cfg.depth,
        "width": model_cfg.width,
        "activation": model_cfg.activation,
        "dropout": model_cfg.dropout,
    }


def build_model(spec: dict[str, Any]) -> nn.Sequential:
    """depth 0 is a single linear layer: sigmoid(θᵀx), i.e. logistic regression."""
    layers: list[nn.Module] = []
    width_in = spec["n_features"]
    for _ in range(spec["depth"]):
        layers += [nn.Linear(width_in, spec["width"]), ACTIVATIONS[spec["activation"]]()]
        if spec["dropout"] > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        width_in = spec["width"]
    layers.append(nn.Linear(width_in, spec["n_outputs"]))
    return nn.Sequential(*layers)
