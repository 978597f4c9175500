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
from safetensors.torch import load as load_safetensors

from dcml.config import PipelineConfig
from dcml.data.catalog import DatasetVersion, read_split_numpy
from dcml.storage import Storage
from dcml.train.loop import (
    HISTORY,
    META,
    WEIGHTS,
    EarlyStop,
    StepOptions,
    evaluate,
    freeze,
    label_tensor,
    load_checkpoint,
    load_matching,
    lr_factor,
    make_loss,
    make_optimizer,
    parse_history,
    predict,
    read_history,
    save_checkpoint,
    shuffled_batches,
    train_epoch,
    write_history,
)
from dcml.train.metrics import task_metrics
from dcml.train.model import build_model, model_spec


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    checkpoint_path: str  # fsspec path of the best checkpoint folder
    metrics: dict[str, Any]  # the best checkpoint's validation metrics
    test_metrics: dict[str, float]  # the best checkpoint on the test split


TEST_METRICS = "test_metrics.json"
PLOTS = "plots"


def _collate(features: list[str], task: str):
    """Ray Data batches (numpy columns) -> (features, label) tensors."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class FeaturesAndLabel(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
            x = np.stack([batch[c] for c in features], axis=1).astype(np.float32, copy=False)
            return torch.from_numpy(x), label_tensor(batch["label"].copy(), task, "cpu")

    return FeaturesAndLabel()


def cache_shard(
    shard, collate, device: torch.device, where: str, name: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a worker's whole shard once through `iter_torch_batches` and keep it: on `device`
    (where="device"; on a GPU only if it fits in half its free memory) or in host memory."""
    parts = list(shard.iter_torch_batches(batch_size=8192, collate_fn=collate, device="cpu"))
    if not parts:
        raise RuntimeError(f"a worker's {name} shard is empty: use fewer train.workers")
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if device.type == "cpu":
        return x, y
    if where == "device":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        if x.nbytes + y.nbytes < free / 2:
            return x.to(device), y.to(device)
        print(
            f"[dcml] the shard ({x.nbytes / 2**30:.1f} GiB) does not fit on {device}; "
            "caching it in host memory",
            flush=True,
        )
    return x.pin_memory(), y.pin_memory()


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs every `report` at INFO on a logger named after its file, which reaches
    the console past `LoggingConfig(log_level)`: a line per epoch per worker. Quiet it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: nothing to quiet
        pass
    # Tune's function trainables (one-worker trials) log each checkpoint they persist
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


def n_outputs(task: str, classes: list | None) -> int:
    return len(classes) if task == "multiclass" else 1


class TrainSession:
    """What the loop needs from its host, as Ray Train gives it to each DDP worker."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def shard(self, split: str):
        import ray.train

        return ray.train.get_dataset_shard(split)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP when world > 1

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)


PBT_STEP = "pbt_step"


class LocalSplit:
    """A stored split read with plain pyarrow, iterated the way the loop iterates a Ray Train
    shard. A PBT trial holds its CPUs itself, so Ray Data tasks inside it could wait forever for
    a CPU on a full node."""

    def __init__(self, table):
        self.table = table

    def iter_torch_batches(
        self, batch_size: int, collate_fn, device="cpu", local_shuffle_seed=None, **_
    ):
        table = self.table
        if local_shuffle_seed is not None:
            rng = np.random.default_rng(local_shuffle_seed)
            table = table.take(rng.permutation(len(table)))
        for start in range(0, len(table), batch_size):
            part = table.slice(start, batch_size)
            cols = {c: part.column(c).to_numpy() for c in part.column_names}
            x, y = collate_fn(cols)
            yield x.to(device), y.to(device)


class TrialSession:
    """The same loop in one process inside a Tune trial (PBT moves checkpoints between trials,
    which needs Tune's own checkpoints): rank 0 of 1, the splits read in the trial."""

    rank, world = 0, 1

    def __init__(self, splits: dict[str, LocalSplit], device: torch.device, epochs: int):
        self.splits, self.device, self.epochs = splits, device, epochs

    def shard(self, split: str) -> LocalSplit:
        return self.splits[split]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(directory) if directory else None
        if metrics["epoch"] + 1 < self.epochs:
            # PBT's clock: absent on the last epoch, so a finished trial is never sent back to
            # copy another's checkpoint (it would restart at its end and train no epoch)
            metrics = {**metrics, PBT_STEP: metrics["epoch"] + 1}
        tune.report(metrics, checkpoint=checkpoint)


def train_func(config: dict[str, Any], session: TrainSession | TrialSession | None = None) -> None:
    """Runs on every Ray Train worker (or in a Tune trial): plain PyTorch, with DDP through the
    session's `prepare`."""
    cfg = PipelineConfig.model_validate(config["cfg"])
    features: list[str] = config["features"]
    task: str = config.get("task", "binary")
    classes: list | None = config.get("classes")
    epochs: int = config.get("epochs") or cfg.train.epochs
    if config.get("progress", True) != "verbose":
        _quiet_report_log()
    session = session or TrainSession()
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    # as many intra-op threads as the CPUs the worker holds: no oversubscription of the node
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    tc = cfg.train
    collate = _collate(features, task)
    train_shard = session.shard("train")
    x = y = None
    if tc.cache != "none":  # read once; every epoch then draws batches from the cache
        x, y = cache_shard(train_shard, collate, device, tc.cache)
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
        storage = Storage.from_config(cfg)
        with storage.fs.open(f"{config['init_path']}/{WEIGHTS}", "rb") as f:
            load_matching(model, load_safetensors(f.read()))
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
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    meta = {"metrics": metrics, "model_spec": spec, "features": features}
                    extra = {**stop.state(), "plateau": plateau.state_dict() if plateau else None}
                    save_checkpoint(d, model, optimizer, epoch, meta, extra)
                    write_history(d, history)
                    session.report(metrics, d)
                else:
                    session.report(metrics)
        else:
            session.report(metrics)
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


def fine_tune_source(
    cfg: PipelineConfig, storage: Storage, features: list[str], spec: dict[str, Any]
) -> str | None:
    """Check that `train.init_from` can seed this model; the registered version's path.

    The features must be the same (same columns, same order: the first layer reads them by
    position), and every frozen layer must be loaded from it."""
    ref = cfg.train.init_from
    if not ref:
        return None
    from dcml.registry import resolve_model

    mv = resolve_model(storage, ref)
    theirs = mv.meta["features"]
    if theirs != features:
        missing = [f for f in theirs if f not in features]
        extra = [f for f in features if f not in theirs]
        detail = f"missing {missing[:5]}, new {extra[:5]}" if missing or extra else "another order"
        raise ValueError(
            f"train.init_from={ref}: it was trained on other features than this dataset's "
            f"({detail})"
        )
    with storage.fs.open(f"{mv.path}/{WEIGHTS}", "rb") as f:
        loaded = set(load_matching(build_model(spec), load_safetensors(f.read())))
    model = build_model(spec)
    unmatched = [n for n in freeze(model, cfg.train.freeze_layers) if n not in loaded]
    if not loaded or unmatched:
        raise ValueError(
            f"train.init_from={ref}: its weights do not fit model "
            f"(depth {spec['depth']}, widths {spec['widths']}); "
            + (f"frozen tensors without a match: {unmatched}" if unmatched else "nothing matches")
        )
    return mv.path


SMALL_SPLIT_BYTES = 64 << 20  # stored Parquet bytes below which the driver reads a split itself


def split_tables(storage: Storage, dataset: DatasetVersion, split: str) -> list:
    """A stored split's shards as pyarrow tables, in file order (the names hold the split)."""
    import pyarrow.parquet as pq

    return [pq.read_table(f, filesystem=storage.fs) for f in dataset.shard_paths(split)]


def split_dataset(storage: Storage, dataset: DatasetVersion, split: str):
    """A stored split as a materialised Ray Dataset, its blocks in file order (so that the same
    seed and worker count give every rank the same rows).

    Materialised in the driver: the workers then split blocks already in the object store instead
    of each starting read tasks (seconds per process on a small node). A small split is read with
    plain pyarrow, which takes milliseconds where Ray Data's read tasks take seconds to start.
    """
    import ray.data

    if sum(s["bytes"] for s in dataset.shards(split)) <= SMALL_SPLIT_BYTES:
        return ray.data.from_arrow(split_tables(storage, dataset, split))
    ds = ray.data.read_parquet(dataset.shard_paths(split), filesystem=storage.arrow_fs())
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def balanced_weights(manifest: dict[str, Any]) -> list[float] | None:
    """Inverse class frequency over the whole training split (classification)."""
    if not manifest.get("class_counts"):
        return None
    counts = np.asarray(manifest["class_counts"]["train"], dtype=np.float64)
    return (counts.sum() / (len(counts) * np.maximum(counts, 1))).tolist()


def loss_of(cfg: PipelineConfig, manifest: dict[str, Any], device=None):
    """The training loss of a run (its class weights included), for validation and test."""
    task = manifest["task"]
    weights = None
    if cfg.train.class_weights == "balanced" and task != "regression":
        weights = balanced_weights(manifest)
    return make_loss(task, cfg.train.loss, weights, device)


def loop_config(
    cfg: PipelineConfig,
    storage: Storage,
    dataset: DatasetVersion,
    epochs: int | None = None,
    progress: bool | str = True,
) -> dict[str, Any]:
    """What `train_func` needs besides its session: config, features, task, class weights, the
    fine-tuning source (checked here, in the driver)."""
    m = dataset.manifest
    spec = model_spec(cfg.model, len(m["features"]), n_outputs(m["task"], m["classes"]))
    return {
        "cfg": cfg.model_dump(),
        "features": m["features"],
        "task": m["task"],
        "classes": m["classes"],
        "class_weights": balanced_weights(m),
        "epochs": epochs,
        "progress": progress,
        "init_path": fine_tune_source(cfg, storage, m["features"], spec),
    }


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
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    workers = workers or cfg.train.workers
    check_resources(cfg, workers)
    datasets = {split: split_dataset(storage, dataset, split) for split in ("train", "validation")}
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config(cfg, storage, dataset, epochs, progress),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        datasets=datasets,
        # every worker evaluates on the whole validation split, so metrics agree across ranks
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path or storage.path("runs"),
            storage_filesystem=storage.arrow_fs(),
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


def best_of(storage: Storage, paths: list[str], metric: str, mode: str) -> str:
    """The checkpoint among `paths` with the best `metric` (later epochs win ties)."""
    sign = 1 if mode == "max" else -1
    best = None
    for path in paths:
        if storage.exists(f"{path}/{META}"):
            m = storage.read_json(f"{path}/{META}")["metrics"]
            key = (sign * m[metric], m["epoch"])
            if best is None or key > best[0]:
                best = (key, path)
    if best is None:
        raise RuntimeError(f"no checkpoint with {metric!r} among {paths}")
    return best[1]


def fit(
    cfg: PipelineConfig, storage: Storage, dataset: DatasetVersion, run_id: str
) -> TrainOutcome:
    """Train, then evaluate the best checkpoint on the test split and write the run's history,
    test metrics and plots next to its checkpoints."""
    result = build_trainer(cfg, storage, dataset, run_id).fit()
    run = storage.path("runs", run_id)
    # Ray's list of kept checkpoints, not every folder: a run killed while uploading can leave a
    # folder that its checkpoint manager never registered.
    kept = [c.path for c, _ in result.best_checkpoints or []]
    path = best_of(storage, kept, cfg.train.metric, cfg.train.mode)
    test, y, out = evaluate_checkpoint(storage, dataset, path, "test")
    storage.write_json(f"{run}/{TEST_METRICS}", {"checkpoint": path, **test})
    history = _publish_history(storage, run, result.checkpoint.path)
    write_plots(storage, run, history, cfg.train.metric, dataset, y, out)
    metrics = storage.read_json(f"{path}/{META}")["metrics"]
    return TrainOutcome(run_id, path, metrics, {f"test_{k}": v for k, v in test.items()})


def evaluate_checkpoint(
    storage: Storage, dataset: DatasetVersion, checkpoint: str, split: str
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """A checkpoint's metrics on a split of the dataset (in the driver); also the labels and
    the model's outputs, for plots."""
    meta = storage.read_json(f"{checkpoint}/{META}")
    model = build_model(meta["model_spec"])
    with storage.fs.open(f"{checkpoint}/{WEIGHTS}", "rb") as f:
        model.load_state_dict(load_safetensors(f.read()))
    _, x, y = read_split_numpy(storage, dataset, split)
    task = dataset.manifest["task"]
    out = predict(model, torch.as_tensor(x), task)
    return task_metrics(task, y, out), y, out


def write_plots(
    storage: Storage,
    run: str,
    history: list[dict[str, float]],
    metric: str,
    dataset: DatasetVersion,
    y: np.ndarray,
    out: np.ndarray,
) -> list[str]:
    """PNGs under <run>/plots/: learning curves; for classification the test split's
    confusion matrix, and its ROC curve for binary tasks."""
    from dcml import plots

    task, classes = dataset.manifest["task"], dataset.manifest["classes"]
    images = {}
    if history:
        images["learning_curves.png"] = plots.learning_curves(history, metric)
    if task == "binary" and len(y):
        auc = task_metrics(task, y, out)["roc_auc"]
        images["roc_curve.png"] = plots.roc_curve(y, out, auc, "ROC curve (test split)")
    if task != "regression" and len(y):
        pred = out.argmax(axis=1) if task == "multiclass" else (out >= 0.5).astype(np.int64)
        images["confusion_matrix.png"] = plots.confusion_matrix(
            y.astype(np.int64), pred, classes, "Confusion matrix (test split)"
        )
    storage.fs.makedirs(f"{run}/{PLOTS}", exist_ok=True)
    for name, data in images.items():
        with storage.fs.open(f"{run}/{PLOTS}/{name}", "wb") as f:
            f.write(data)
    return [f"{run}/{PLOTS}/{name}" for name in images]


def _publish_history(storage: Storage, run: str, latest: str) -> list[dict[str, float]]:
    """runs/<run_id>/history.csv: the per-epoch metrics kept in the run's latest checkpoint."""
    if not storage.exists(f"{latest}/{HISTORY}"):
        return []
    with storage.fs.open(f"{latest}/{HISTORY}", "rb") as f:
        data = f.read()
    with storage.fs.open(f"{run}/{HISTORY}", "wb") as f:
        f.write(data)
    return parse_history(data.decode())


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
