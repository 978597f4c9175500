"""One optimiser step and one epoch in plain PyTorch, with the pieces around them: optimiser,
loss, schedule, early stopping, mixed precision, shuffled batches, outputs and evaluation.

Nothing here imports Ray, so the same step can be checked on a machine that has torch and no Ray.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dcml.train.metrics import task_metrics


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
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers take no steps
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(
    task: str, loss: str = "auto", class_weights: list[float] | None = None, device=None
) -> Loss:
    """The loss of a task on the model's raw outputs: BCE with logits (binary, one output),
    cross-entropy (multiclass), MSE or Huber (regression). `class_weights` weigh classes (their
    tensor lives on `device`, where the outputs are)."""
    if task == "multiclass":
        weight = None
        if class_weights:
            weight = torch.tensor(class_weights, dtype=torch.float32, device=device)
        ce = nn.CrossEntropyLoss(weight=weight)
        return lambda out, y: ce(out, y.long())
    if task == "regression":
        fn = nn.HuberLoss() if loss == "huber" else nn.MSELoss()
        return lambda out, y: fn(out.squeeze(-1), y)
    pos_weight = None
    if class_weights:
        ratio = class_weights[1] / class_weights[0]
        pos_weight = torch.tensor([ratio], dtype=torch.float32, device=device)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return lambda out, y: bce(out.squeeze(-1), y)


def label_tensor(y: np.ndarray, task: str, device) -> torch.Tensor:
    dtype = torch.long if task == "multiclass" else torch.float32
    return torch.as_tensor(np.array(y), dtype=dtype, device=device)  # a copy: y may be read-only


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
    unit: str = "epochs"  # what `patience` counts (gbdt: rounds)

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
            self.reason = f"no improvement for {self.patience} {self.unit}"
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


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def shuffled_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` mini-batches of cached (x, y) in a seeded random order, moved to `device` if the
    cache is elsewhere (host memory). Under DDP every rank must take the same number of steps, so
    `steps` comes from the caller and a rank with fewer rows wraps around."""
    order = torch.randperm(len(x), generator=generator).to(x.device)
    move = device is not None and torch.device(device) != x.device
    for step in range(steps):
        idx = order[(step * batch_size) % len(x) :][:batch_size]
        xb, yb = x[idx], y[idx]
        if move:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    loss_fn: Loss | None = None,
    options: StepOptions = StepOptions(),
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over `batches` of (x, y); the mean loss."""
    model.train()
    loss_fn = loss_fn or make_loss("binary")
    total, steps, pending = None, 0, False
    optimizer.zero_grad(set_to_none=True)
    for xb, yb in batches:
        with autocast(xb.device, options.precision):
            loss = loss_fn(model(xb).float(), yb)
        if options.l1:
            loss = loss + options.l1 * sum(p.abs().sum() for p in model.parameters())
        # summed on the device: no host sync per step
        total = loss.detach() if total is None else total + loss.detach()
        steps += 1
        (scaler.scale(loss / options.accum) if scaler else loss / options.accum).backward()
        pending = True
        if steps % options.accum == 0:
            _step(model, optimizer, options, scaler)
            pending = False
    if pending:  # the tail of an epoch that is not a multiple of `accum`
        _step(model, optimizer, options, scaler)
    mean = total.item() / steps if steps else 0.0
    if not math.isfinite(mean):
        raise FloatingPointError(f"training loss became {mean}")
    return mean


def _step(model, optimizer, options: StepOptions, scaler) -> None:
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


@torch.no_grad()
def raw_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """The model's outputs (logits, values) in float32, in eval mode."""
    if model.training:  # eval() walks every module: a served model is in eval mode already
        model.eval()
    if len(x) <= batch_size:
        return model(x).float()
    outs = [model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, device=x.device)


def read_outputs(out: torch.Tensor, task: str) -> np.ndarray:
    """Outputs as a task reads them: P(positive) for binary, class probabilities (rows,
    classes) for multiclass, the value for regression."""
    if task == "multiclass":
        out = torch.softmax(out, dim=-1)
    elif task == "regression":
        out = out.squeeze(-1)
    else:
        out = torch.sigmoid(out.squeeze(-1))
    return out.cpu().numpy()


def predict(model: nn.Module, x: torch.Tensor, task: str, batch_size: int = 8192) -> np.ndarray:
    if len(x) == 0:
        return np.empty(0, dtype=np.float32)
    return read_outputs(raw_outputs(model, x, batch_size), task)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    task: str = "binary",
    loss_fn: Loss | None = None,
    prefix: str = "val_",
    threshold: float = 0.5,
) -> dict[str, float]:
    """The task's metrics on (x, y), and `loss` (the training loss) when `loss_fn` is given;
    a binary model's labels from `threshold`."""
    return evaluate_outputs(raw_outputs(model, x), y, task, loss_fn, prefix, threshold)


def evaluate_outputs(
    out: torch.Tensor,
    y: np.ndarray,
    task: str = "binary",
    loss_fn: Loss | None = None,
    prefix: str = "val_",
    threshold: float = 0.5,
) -> dict[str, float]:
    """`evaluate` on raw outputs (logits, values) however they were computed: an MLP's, or a
    boosted model's margins."""
    metrics = task_metrics(task, y, read_outputs(out, task), threshold)
    if loss_fn is not None:
        metrics = {"loss": float(loss_fn(out, label_tensor(y, task, out.device))), **metrics}
    return {prefix + k: v for k, v in metrics.items()}
