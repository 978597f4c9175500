"""The training loop in plain PyTorch: runs under Ray Train, under Tune, and alone in one process.

Nothing here imports Ray, so the same step can be checked on a machine that has torch and no Ray.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dcml.train.metrics import task_metrics

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
META = "meta.json"
HISTORY = "history.csv"


@dataclass(frozen=True)
class StepOptions:
    """How each optimiser step is taken (from `train.*` in the config)."""

    accum: int = 1  # mini-batches per optimiser step
    clip: float | None = None  # max gradient norm
    l1: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16

    @classmethod
    def from_config(cls, t) -> StepOptions:
        return cls(t.grad_accum, t.grad_clip, t.l1, t.precision)


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
):
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(task: str, loss: str = "auto", class_weights: list[float] | None = None) -> Loss:
    """The loss of a task on the model's raw outputs: BCE with logits (binary, one output),
    cross-entropy (multiclass), MSE or Huber (regression). `class_weights` weigh classes."""
    if task == "multiclass":
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        ce = nn.CrossEntropyLoss(weight=weight)
        return lambda out, y: ce(out, y.long())
    if task == "regression":
        fn = nn.HuberLoss() if loss == "huber" else nn.MSELoss()
        return lambda out, y: fn(out.squeeze(-1), y)
    pos_weight = None
    if class_weights:
        pos_weight = torch.tensor([class_weights[1] / class_weights[0]], dtype=torch.float32)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return lambda out, y: bce(out.squeeze(-1), y)


def label_tensor(y: np.ndarray, task: str, device) -> torch.Tensor:
    dtype = torch.long if task == "multiclass" else torch.float32
    return torch.as_tensor(np.asarray(y), dtype=dtype, device=device)


def lr_factor(epoch: int, t) -> float:
    """The learning rate of `epoch` relative to `train.lr`: warm-up, then the schedule
    (plateau decays are applied by `ReduceLROnPlateau` on top of this)."""
    if epoch < t.warmup_epochs:
        return (epoch + 1) / (t.warmup_epochs + 1)
    after = epoch - t.warmup_epochs
    if t.schedule == "cosine":
        span = max(t.epochs - t.warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
    if t.schedule == "step":
        return t.gamma ** (after // t.step_size)
    return 1.0


@dataclass
class EarlyStop:
    """ "Training done?": no improvement for `patience` epochs, or the metric reached `target`."""

    mode: str  # max | min
    patience: int | None = None
    min_delta: float = 0.0
    target: float | None = None
    best: float | None = None
    bad_epochs: int = 0
    reason: str = ""  # why it stopped

    def update(self, value: float) -> bool:
        """Record an epoch's metric; True when training should stop."""
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.target is not None and sign * (value - self.target) >= 0:
            self.reason = f"reached the target {self.target:g}"
        elif self.patience is not None and self.bad_epochs >= self.patience:
            self.reason = f"no improvement for {self.patience} epochs"
        return bool(self.reason)

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    loss_fn: Loss | None = None,
    options: StepOptions = StepOptions(),
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass of `steps` mini-batches over (x, y) in a seeded random order; mean loss.

    Under DDP every rank must take the same number of steps, so `steps` comes from the caller.
    """
    model.train()
    loss_fn = loss_fn or make_loss("binary")
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total = torch.zeros((), device=x.device)  # summed on the device: no sync per step
    optimizer.zero_grad(set_to_none=True)
    for step in range(steps):
        idx = order[(step * batch_size) % len(x) :][:batch_size]
        with autocast(x.device, options.precision):
            loss = loss_fn(model(x[idx]).float(), y[idx])
        if options.l1:
            loss = loss + options.l1 * sum(p.abs().sum() for p in model.parameters())
        total += loss.detach()
        loss = loss / options.accum
        (scaler.scale(loss) if scaler else loss).backward()
        if (step + 1) % options.accum == 0 or step == steps - 1:
            if scaler:
                scaler.unscale_(optimizer)
            if options.clip:
                nn.utils.clip_grad_norm_(model.parameters(), options.clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    mean = total.item() / max(steps, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"training loss became {mean}")
    return mean


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, task: str, batch_size: int = 8192) -> np.ndarray:
    """Model outputs as a task reads them: P(positive) for binary, class probabilities (rows,
    classes) for multiclass, the value for regression."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size]).float()
        if task == "multiclass":
            outs.append(torch.softmax(out, dim=-1))
        elif task == "regression":
            outs.append(out.squeeze(-1))
        else:
            outs.append(torch.sigmoid(out.squeeze(-1)))
    return torch.cat(outs).cpu().numpy() if outs else np.empty(0, dtype=np.float32)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: np.ndarray, task: str = "binary", prefix: str = "val_"
) -> dict[str, float]:
    return {prefix + k: v for k, v in task_metrics(task, y, predict(model, x, task)).items()}


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
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def load_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[int, dict[str, Any]]:
    """Restore weights (and optimiser state) without pickle; (next epoch, the extra state)."""
    unwrap(model).load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    state = torch.load(os.path.join(path, TRAIN_STATE), weights_only=True, map_location="cpu")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, state.get("extra", {})


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
    task: str = "binary",
    loss_fn: Loss | None = None,
    options: StepOptions = StepOptions(),
    stop: tuple[str, EarlyStop] | None = None,
) -> list[dict[str, float]]:
    """The whole loop in one process without Ray (debugging, GPU checks).

    `stop` is (metric, EarlyStop): the loop ends early when it says so.
    """
    x = torch.as_tensor(train_xy[0], device=device)
    y = label_tensor(train_xy[1], task, device)
    vx = torch.as_tensor(val_xy[0], device=device)
    loss_fn = loss_fn or make_loss(task)
    steps = math.ceil(len(x) / batch_size)
    history = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loss = train_epoch(model, optimizer, x, y, batch_size, steps, g, loss_fn, options)
        metrics = {"epoch": epoch, "train_loss": loss, **evaluate(model, vx, val_xy[1], task)}
        history.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
        if stop is not None and stop[1].update(metrics[stop[0]]):
            break
    return history
