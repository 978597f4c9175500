"""Checkpoints and per-epoch history: weights as safetensors, optimiser state loaded with
`weights_only=True`, history as CSV. No Ray."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dcml.layout import HISTORY, META, TRAIN_STATE, WEIGHTS


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Weights as safetensors; optimiser (and scheduler, early-stopping) state for resuming."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "epoch": epoch, "extra": extra or {}},
        os.path.join(path, TRAIN_STATE),
    )
    with open(os.path.join(path, META), "w") as f:
        json.dump({**meta, "epoch": epoch}, f, indent=2, sort_keys=True)


def write_history(path: str, history: list[dict[str, float]]) -> None:
    """Per-epoch metrics as CSV (one row per epoch, the union of columns)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(os.path.join(path, HISTORY), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def read_history(path: str) -> list[dict[str, float]]:
    file = os.path.join(path, HISTORY)
    if not os.path.exists(file):
        return []
    with open(file, newline="") as f:
        return parse_history(f.read())


def parse_history(text: str) -> list[dict[str, float]]:
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


def load_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[int, dict[str, Any]]:
    """Restore weights (and optimiser state) without pickle; (next epoch, the extra state)."""
    unwrap(model).load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    state = torch.load(os.path.join(path, TRAIN_STATE), weights_only=True, map_location="cpu")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, state.get("extra", {})


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Fine-tuning: load the tensors of `state` whose name and shape match the model's (a new
    head or wider layers start fresh); the names loaded."""
    own = unwrap(model).state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unwrap(model).load_state_dict(matched, strict=False)
    return sorted(matched)


def freeze(model: nn.Module, layers: int) -> list[str]:
    """Fix the weights of the first `layers` hidden layers (from the input); their names.
    Call before wrapping the model in DDP, which then leaves them out of gradient sync."""
    names = []
    for i, block in enumerate(list(unwrap(model))[:layers]):
        for name, p in block.named_parameters():
            p.requires_grad_(False)
            names.append(f"{i}.{name}")
    return names


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
