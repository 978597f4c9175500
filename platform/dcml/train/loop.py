"""The training loop in plain PyTorch: runs under Ray Train, under Tune, and alone in one process.

Nothing here imports Ray, so the same step can be checked on a machine that has torch and no Ray.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dcml.train.metrics import binary_metrics

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
META = "meta.json"


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float):
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
) -> float:
    """One pass of `steps` mini-batches over (x, y) in a seeded random order; mean loss.

    Under DDP every rank must take the same number of steps, so `steps` comes from the caller.
    """
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total = 0.0
    for step in range(steps):
        idx = order[(step * batch_size) % len(x) :][:batch_size]
        logits = model(x[idx]).squeeze(-1)
        loss = loss_fn(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        if not math.isfinite(total):
            raise FloatingPointError(f"training loss became {total} at step {step}")
    return total / max(steps, 1)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    out = [
        torch.sigmoid(model(x[i : i + batch_size]).squeeze(-1).float())
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).cpu().numpy() if out else np.empty(0, dtype=np.float32)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: np.ndarray, prefix: str = "val_"
) -> dict[str, float]:
    return {prefix + k: v for k, v in binary_metrics(y, predict_proba(model, x)).items()}


def save_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, meta: dict[str, Any]
) -> None:
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "epoch": epoch}, os.path.join(path, TRAIN_STATE)
    )
    with open(os.path.join(path, META), "w") as f:
        json.dump({**meta, "epoch": epoch}, f, indent=2, sort_keys=True)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Restore weights (and optimiser state) without pickle; return the next epoch to run."""
    unwrap(model).load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    state = torch.load(os.path.join(path, TRAIN_STATE), weights_only=True, map_location="cpu")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def fit_in_process(
    model: nn.Module,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
    device: str = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """The whole loop in one process without Ray (debugging, GPU checks)."""
    x = torch.as_tensor(train_xy[0], device=device)
    y = torch.as_tensor(train_xy[1], dtype=torch.float32, device=device)
    vx = torch.as_tensor(val_xy[0], device=device)
    steps = math.ceil(len(x) / batch_size)
    history = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loss = train_epoch(model, optimizer, x, y, batch_size, steps, g)
        metrics = {"epoch": epoch, "train_loss": loss, **evaluate(model, vx, val_xy[1])}
        history.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
    return history
