"""The training loop: one loop, in plain PyTorch, that runs on every Ray Train worker (DDP), in a
one-process Tune trial, and in one process without Ray (`fit_local`), through a session
(dcml.train.session) that gives it its data, device and a place to report.

Nothing here imports Ray, so the loop can be checked on a machine that has torch and no Ray.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from dcml.config import PipelineConfig
from dcml.layout import read_weights
from dcml.storage import Storage
from dcml.train.checkpoint import (
    freeze,
    load_checkpoint,
    load_matching,
    read_history,
    save_checkpoint,
    write_history,
)
from dcml.train.ingest import cache_shard, collate_fn, slice_bounds
from dcml.train.model import build_model, model_spec, n_outputs
from dcml.train.session import LocalSession, quiet_report_log
from dcml.train.step import (
    EarlyStop,
    StepOptions,
    evaluate,
    lr_factor,
    make_loss,
    make_optimizer,
    shuffled_batches,
    train_epoch,
)


def train_func(config: dict[str, Any], session=None) -> None:
    """Runs on every Ray Train worker (or in a Tune trial): plain PyTorch, with DDP through the
    session's `prepare`."""
    cfg = config["cfg"]
    if not isinstance(cfg, PipelineConfig):
        cfg = PipelineConfig.model_validate(cfg)
    features: list[str] = config["features"]
    task: str = config.get("task", "binary")
    classes: list | None = config.get("classes")
    epochs = cfg.train.epochs  # the one budget: the schedule spans it, a trial's config sets it
    if config.get("progress", True) != "verbose":
        quiet_report_log()
    if session is None:  # on a Ray Train worker
        from dcml.train.session import TrainSession

        session = TrainSession()
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    # as many intra-op threads as the CPUs the worker holds: no oversubscription of the node
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    tc = cfg.train
    collate = collate_fn(features, task)
    train_shard = session.shard("train")
    x = y = None
    if tc.cache != "none":  # read once; every epoch then draws batches from the cache
        # a small split comes whole to every worker, which keeps its slice (no split coordinator)
        part = None
        if config.get("train_rows"):
            part = slice_bounds(config["train_rows"], rank, world)
        x, y = cache_shard(train_shard, collate, device, tc.cache, rows=part)
    vx, vy = cache_shard(session.shard("validation"), collate, device, "device", "validation")
    vx, vy = vx.to(device), vy.cpu().numpy()
    weights = None
    if tc.class_weights == "balanced" and task != "regression":
        weights = config["class_weights"]  # from the whole training split, not this shard
    loss_fn = make_loss(task, tc.loss, weights, device)
    steps = 0
    if x is not None:
        steps = math.ceil(len(x) / tc.batch_size)
        if world > 1 and torch.distributed.is_initialized():
            # every DDP rank must take the same number of steps per epoch
            t = torch.tensor([steps], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            steps = int(t.item())

    spec = model_spec(cfg.model, len(features), n_outputs(task, classes))
    model = build_model(spec)
    checkpoint = session.checkpoint()
    if config.get("init_path") and checkpoint is None:  # fine-tuning (a resumed run has its own)
        state = load_safetensors(read_weights(Storage.from_config(cfg), config["init_path"]))
        load_matching(model, state)
    freeze(model, tc.freeze_layers)
    model = session.prepare(model)
    optimizer = make_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, tc.momentum)
    plateau = None
    if tc.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=tc.mode, factor=tc.gamma, patience=2
        )
    stop = EarlyStop(tc.mode, tc.patience, tc.min_delta, tc.target)
    options = StepOptions.from_config(tc)
    scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
    start, history = 0, []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start, extra = load_checkpoint(d, model, optimizer)
            history = read_history(d)
        if plateau is not None and "plateau" in extra:
            plateau.load_state_dict(extra["plateau"])
        stop.best, stop.bad_epochs = extra.get("best"), extra.get("bad_epochs", 0)
        restore_rng(extra, device)
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if rank == 0 and config.get("progress", True):
            print(f"[dcml] resuming from the checkpoint of epoch {start}", flush=True)

    for epoch in range(start, epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        t0 = time.perf_counter()
        if plateau is None or epoch < tc.warmup_epochs:  # plateau decays from its own state
            for group in optimizer.param_groups:
                group["lr"] = tc.lr * lr_factor(epoch, tc)
        if x is not None:
            batches = shuffled_batches(x, y, tc.batch_size, steps, g, device)
        else:  # streamed: Ray Train's equal split gives every rank the same number of rows
            batches = train_shard.iter_torch_batches(
                batch_size=tc.batch_size,
                collate_fn=collate,
                device=device,
                local_shuffle_buffer_size=max(tc.shuffle_buffer, tc.batch_size),
                local_shuffle_seed=cfg.seed * 100_003 + epoch * 1_009 + rank,
                prefetch_batches=2,
            )
        t_train = time.perf_counter()
        loss = train_epoch(model, optimizer, batches, loss_fn, options, scaler)
        t_train = time.perf_counter() - t_train
        if world > 1 and torch.distributed.is_initialized():
            t = torch.tensor([loss], device=device)
            torch.distributed.all_reduce(t)
            loss = t.item() / world
        metrics = {"epoch": epoch, "train_loss": loss, **evaluate(model, vx, vy, task, loss_fn)}
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch_s"] = time.perf_counter() - t0  # training, evaluation and all
        metrics["train_s"] = t_train  # the training steps alone (throughput)
        metrics["time"] = time.time()  # wall clock at the end of the epoch
        history.append(metrics)
        if plateau is not None and epoch >= tc.warmup_epochs:
            plateau.step(metrics[tc.metric])
        # Every rank sees the same validation metrics (the model is in sync), so all stop together.
        done = stop.update(metrics[tc.metric])
        last = epoch == epochs - 1 or done
        if rank == 0 and config.get("progress", True):
            shown = " ".join(
                f"{k}={v:.4f}"
                for k, v in metrics.items()
                if k == "train_loss" or k.startswith("val_")
            )
            print(f"[dcml] epoch {epoch + 1}/{epochs} {shown}", flush=True)
        if done:  # it stopped itself (a sweep tells this from its scheduler's stops)
            metrics = {**metrics, "finished": 1}
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    meta = {"metrics": metrics, "model_spec": spec, "features": features}
                    extra = {**stop.state(), "plateau": plateau.state_dict() if plateau else None}
                    extra |= rng_state(device)
                    if scaler is not None:
                        extra["scaler"] = scaler.state_dict()
                    save_checkpoint(d, model, optimizer, epoch, meta, extra)
                    write_history(d, history)
                    session.report(metrics, d)
                else:
                    session.report(metrics)
        else:
            session.report(metrics)
        if done:
            if rank == 0 and config.get("progress", True):
                print(
                    f"[dcml] stopping after epoch {epoch + 1}: {tc.metric} {stop.reason}",
                    flush=True,
                )
            break


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random state dropout draws from, for a resumed run to go on as if never stopped.
    Every rank seeds the same generator and draws alike, so rank 0's state is every rank's."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(extra: dict[str, Any], device: torch.device) -> None:
    if "rng" in extra:  # checkpoints before it was stored re-seed instead
        torch.set_rng_state(extra["rng"])
    if device.type == "cuda" and "cuda_rng" in extra:
        torch.cuda.set_rng_state(extra["cuda_rng"], device)


def fit_local(
    cfg: PipelineConfig,
    splits: dict[str, Any],
    folder: str,
    features: list[str],
    task: str = "binary",
    classes: list | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """`train_func` in this process without Ray: `splits` are pyarrow tables (`train`,
    `validation`: id, label, features), checkpoints go to `folder` (and a rerun on the same
    folder resumes from the latest). Returns the metrics reported, one dict per epoch."""
    session = LocalSession(splits, folder, device)
    config = {"cfg": cfg, "features": features, "task": task, "classes": classes}
    loop = train_func
    if cfg.model.family == "gbdt":
        from dcml.train.gbdt import gbdt_train_func as loop
    loop({**config, "class_weights": None, "progress": False}, session)
    return session.reported
