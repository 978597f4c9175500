"""Ray Train wiring: the per-worker function and the one place that builds a `TorchTrainer`.

Both `dcml train` and every Tune trial build their trainer with `build_trainer`, so the two cannot
drift apart. Ray-version-specific calls for training live here.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dcml.config import PipelineConfig
from dcml.data.preprocess import DatasetVersion
from dcml.storage import Storage
from dcml.train.loop import (
    HISTORY,
    META,
    EarlyStop,
    StepOptions,
    evaluate,
    label_tensor,
    load_checkpoint,
    lr_factor,
    make_loss,
    make_optimizer,
    read_history,
    save_checkpoint,
    train_epoch,
    write_history,
)
from dcml.train.model import build_model, model_spec


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    checkpoint_path: str  # fsspec path of the best checkpoint folder
    metrics: dict[str, Any]  # the best checkpoint's validation metrics


def _shard_to_numpy(shard, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):
        xs.append(np.stack([batch[c] for c in features], axis=1).astype(np.float32))
        ys.append(batch["label"])
    if not xs:
        return np.empty((0, len(features)), np.float32), np.empty(0, np.float32)
    return np.concatenate(xs), np.concatenate(ys)


def n_outputs(task: str, classes: list | None) -> int:
    return len(classes) if task == "multiclass" else 1


def train_func(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: plain PyTorch, with DDP through `prepare_model`."""
    import ray.train
    import ray.train.torch

    cfg = PipelineConfig.model_validate(config["cfg"])
    features: list[str] = config["features"]
    task: str = config.get("task", "binary")
    classes: list | None = config.get("classes")
    epochs: int = config.get("epochs") or cfg.train.epochs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    # Tabular shards fit in memory: read each worker's shard once, then run epochs over tensors.
    x, y = _shard_to_numpy(ray.train.get_dataset_shard("train"), features)
    vx, vy = _shard_to_numpy(ray.train.get_dataset_shard("validation"), features)
    weights = None
    if cfg.train.class_weights == "balanced" and task != "regression":
        weights = config["class_weights"]  # from the whole training split, not this shard
    loss_fn = make_loss(task, cfg.train.loss, weights)
    x, y = torch.as_tensor(x, device=device), label_tensor(y, task, device)
    vx = torch.as_tensor(vx, device=device)
    steps = math.ceil(len(x) / cfg.train.batch_size)
    if world > 1 and torch.distributed.is_initialized():
        # every DDP rank must take the same number of steps per epoch
        t = torch.tensor([steps], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        steps = int(t.item())

    tc = cfg.train
    spec = model_spec(cfg.model, len(features), n_outputs(task, classes))
    model = ray.train.torch.prepare_model(build_model(spec))
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
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start, extra = load_checkpoint(d, model, optimizer)
            history = read_history(d)
        if plateau is not None and "plateau" in extra:
            plateau.load_state_dict(extra["plateau"])
        stop.best, stop.bad_epochs = extra.get("best"), extra.get("bad_epochs", 0)

    for epoch in range(start, epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        t0 = time.perf_counter()
        if plateau is None or epoch < tc.warmup_epochs:  # plateau decays from its own state
            for group in optimizer.param_groups:
                group["lr"] = tc.lr * lr_factor(epoch, tc)
        loss = train_epoch(
            model, optimizer, x, y, tc.batch_size, steps, g, loss_fn, options, scaler
        )
        if world > 1 and torch.distributed.is_initialized():
            t = torch.tensor([loss], device=device)
            torch.distributed.all_reduce(t)
            loss = t.item() / world
        metrics = {"epoch": epoch, "train_loss": loss, **evaluate(model, vx, vy, task)}
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch_s"] = time.perf_counter() - t0
        history.append(metrics)
        if plateau is not None and epoch >= tc.warmup_epochs:
            plateau.step(metrics[tc.metric])
        # Every rank sees the same validation metrics (the model is in sync), so all stop together.
        done = stop.update(metrics[tc.metric])
        last = epoch == epochs - 1 or done
        if rank == 0 and config.get("progress", True):
            shown = " ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("train_", "val_"))
            )
            print(f"[dcml] epoch {epoch + 1}/{epochs} {shown}", flush=True)
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    meta = {"metrics": metrics, "model_spec": spec, "features": features}
                    extra = {**stop.state(), "plateau": plateau.state_dict() if plateau else None}
                    save_checkpoint(d, model, optimizer, epoch, meta, extra)
                    write_history(d, history)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(metrics)
        else:
            ray.train.report(metrics)
        if done:
            if rank == 0 and config.get("progress", True):
                print(f"[dcml] stopping after epoch {epoch + 1}: {tc.metric} {stop.reason}")
            break


def check_resources(cfg: PipelineConfig, workers: int) -> None:
    """Fail fast where Ray would wait forever for resources that do not exist."""
    import ray

    res = ray.cluster_resources()
    if cfg.train.use_gpu and res.get("GPU", 0) < workers:
        raise RuntimeError(
            f"train.use_gpu is on but the cluster has {res.get('GPU', 0):g} GPU(s) for {workers} "
            "worker(s); set train.use_gpu=false or add GPUs"
        )
    need = workers * cfg.train.cpus_per_worker
    if res.get("CPU", 0) < need:
        raise RuntimeError(
            f"train.workers={workers} x train.cpus_per_worker={cfg.train.cpus_per_worker} needs "
            f"{need:g} CPUs; the cluster has {res.get('CPU', 0):g}"
        )


def build_trainer(
    cfg: PipelineConfig,
    storage: Storage,
    dataset: DatasetVersion,
    run_name: str,
    *,
    storage_path: str | None = None,
    workers: int | None = None,
    epochs: int | None = None,
    callbacks: list | None = None,
    progress: bool = True,
):
    import ray.data
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    m = dataset.manifest
    class_weights = None
    if m.get("class_counts"):  # inverse frequency over the whole training split
        counts = np.asarray(m["class_counts"]["train"], dtype=np.float64)
        class_weights = (counts.sum() / (len(counts) * np.maximum(counts, 1))).tolist()
    workers = workers or cfg.train.workers
    check_resources(cfg, workers)
    fs = storage.arrow_fs()
    datasets = {
        # Materialised once in the driver: the workers then split blocks already in the object
        # store instead of each starting its own read tasks (seconds per process on a small node).
        split: ray.data.read_parquet(dataset.split_path(split), filesystem=fs).materialize()
        for split in ("train", "validation")
    }
    return TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "features": m["features"],
            "task": m["task"],
            "classes": m["classes"],
            "class_weights": class_weights,
            "epochs": epochs,
            "progress": progress,
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        datasets=datasets,
        # every worker evaluates on the whole validation split, so metrics agree across ranks
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path or storage.path("runs"),
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.metric,
                checkpoint_score_order=cfg.train.mode,
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="INFO" if progress == "verbose" else "WARNING"),
        ),
    )


def best_checkpoint(storage: Storage, run_path: str, metric: str, mode: str) -> str:
    """The stored checkpoint of a run with the best `metric` (later epochs win ties)."""
    sign = 1 if mode == "max" else -1
    best = None
    for name in storage.ls(run_path):
        meta_path = f"{run_path}/{name}/{META}"
        if name.startswith("checkpoint_") and storage.exists(meta_path):
            m = storage.read_json(meta_path)["metrics"]
            key = (sign * m[metric], m["epoch"])
            if best is None or key > best[0]:
                best = (key, f"{run_path}/{name}")
    if best is None:
        raise RuntimeError(f"no checkpoint with {metric!r} under {run_path}")
    return best[1]


def fit(
    cfg: PipelineConfig, storage: Storage, dataset: DatasetVersion, run_id: str
) -> TrainOutcome:
    build_trainer(cfg, storage, dataset, run_id).fit()
    run = storage.path("runs", run_id)
    _publish_history(storage, run)
    path = best_checkpoint(storage, run, cfg.train.metric, cfg.train.mode)
    return TrainOutcome(run_id, path, storage.read_json(f"{path}/{META}")["metrics"])


def _publish_history(storage: Storage, run: str) -> None:
    """runs/<run_id>/history.csv: the per-epoch metrics of the run's latest checkpoint."""
    latest = None
    for name in storage.ls(run):
        meta = f"{run}/{name}/{META}"
        if name.startswith("checkpoint_") and storage.exists(f"{run}/{name}/{HISTORY}"):
            epoch = storage.read_json(meta)["epoch"]
            latest = max(latest or (epoch, name), (epoch, name))
    if latest is not None:
        with storage.fs.open(f"{run}/{latest[1]}/{HISTORY}", "rb") as f:
            data = f.read()
        with storage.fs.open(f"{run}/{HISTORY}", "wb") as f:
            f.write(data)


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
