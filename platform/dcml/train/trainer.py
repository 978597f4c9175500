"""Ray Train wiring: the one place that builds a trainer (a `TorchTrainer` for the MLP, an
`XGBoostTrainer` for gbdt), and a training run from start to outputs.

Both `dcml train` and every Tune trial that trains on Ray Train workers build their trainer with
`build_trainer`, so the two cannot drift apart. Ray-version-specific calls for training live here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.torch import load

from dcml import console
from dcml.config import PipelineConfig
from dcml.data.catalog import DatasetVersion
from dcml.direction import best_by
from dcml.layout import GAIN, IMPORTANCE, META, TEST_METRICS, read_weights, run_folder
from dcml.storage import Storage
from dcml.train.checkpoint import freeze, load_matching
from dcml.train.ingest import SMALL_SPLIT_BYTES, is_small, split_dataset
from dcml.train.loop import train_func
from dcml.train.model import build_model, model_spec, n_outputs
from dcml.train.outputs import (
    evaluate_checkpoint,
    permutation_importance,
    publish_history,
    write_plots,
)
from dcml.train.step import make_loss


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    checkpoint_path: str  # fsspec path of the best checkpoint folder
    metrics: dict[str, Any]  # the best checkpoint's validation metrics
    test_metrics: dict[str, float]  # the best checkpoint on the test split


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
    if mv.meta["model_spec"].get("kind") == "gbdt":
        raise ValueError(
            f"train.init_from={ref} is a gbdt model: fine-tuning starts from an MLP version"
        )
    theirs = mv.meta["features"]
    if theirs != features:
        missing = [f for f in theirs if f not in features]
        extra = [f for f in features if f not in theirs]
        detail = f"missing {missing[:5]}, new {extra[:5]}" if missing or extra else "another order"
        raise ValueError(
            f"train.init_from={ref}: it was trained on other features than this dataset's "
            f"({detail})"
        )
    loaded = set(load_matching(build_model(spec), load(read_weights(storage, mv.path))))
    model = build_model(spec)
    unmatched = [n for n in freeze(model, cfg.train.freeze_layers) if n not in loaded]
    if not loaded or unmatched:
        raise ValueError(
            f"train.init_from={ref}: its weights do not fit model "
            f"(depth {spec['depth']}, widths {spec['widths']}); "
            + (f"frozen tensors without a match: {unmatched}" if unmatched else "nothing matches")
        )
    return mv.path


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
    cfg: PipelineConfig, storage: Storage, dataset: DatasetVersion, progress: bool | str = True
) -> dict[str, Any]:
    """What `train_func` needs besides its session: config, features, task, class weights, the
    fine-tuning source (checked here, in the driver). The epoch budget is `cfg.train.epochs`."""
    m = dataset.manifest
    spec = model_spec(cfg.model, len(m["features"]), n_outputs(m["task"], m["classes"]))
    return {
        "cfg": cfg,
        "features": m["features"],
        "task": m["task"],
        "classes": m["classes"],
        "class_weights": balanced_weights(m),
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
    callbacks: list | None = None,
    progress: bool | str = True,
    report_every: int | None = None,
):
    """`report_every`: gbdt's rounds per report in a sweep (model.gbdt.checkpoint_every
    otherwise)."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    trainer_class, train_loop = TorchTrainer, train_func
    if cfg.model.family == "gbdt":
        from dcml.train.booster import require_xgboost

        require_xgboost()  # before Ray's XGBoost module, which imports XGBoost itself
        from ray.train.xgboost import XGBoostTrainer

        from dcml.train.gbdt import gbdt_train_func

        trainer_class, train_loop = XGBoostTrainer, gbdt_train_func
    workers = workers or cfg.train.workers
    rows = dataset.manifest["rows"]["train"]
    if rows < workers:  # refused before any worker starts: some would have no rows
        raise ValueError(f"the training split has {rows} row(s) for train.workers={workers}")
    check_resources(cfg, workers)
    datasets = {split: split_dataset(storage, dataset, split) for split in ("train", "validation")}
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    # A small cached training split goes whole to every worker, which keeps its own slice: Ray
    # Data's streaming split starts a coordinator actor per run (~4 s on 2 cores, for any size).
    # Small: its stored Parquet and its rows as float32 tensors (what a worker reads through).
    decoded = rows * (len(dataset.manifest["features"]) + 1) * 4
    small = is_small(dataset, "train") and decoded <= SMALL_SPLIT_BYTES
    sliced = cfg.train.cache != "none" and small
    config = {**loop_config(cfg, storage, dataset, progress), "train_rows": rows if sliced else 0}
    config["report_every"] = report_every
    return trainer_class(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        datasets=datasets,
        # every worker evaluates on the whole validation split, so metrics agree across ranks
        dataset_config=DataConfig(
            datasets_to_split=[] if sliced else ["train"], execution_options=ingest
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path or run_folder(storage),
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


def best_checkpoint(storage: Storage, paths: list[str], metric: str, mode: str) -> str:
    """The checkpoint among `paths` with the best `metric` (later epochs win ties); a path
    whose meta.json is gone (deleted since it was listed) is skipped."""
    found = []
    for path in paths:
        if storage.exists(f"{path}/{META}"):
            m = storage.read_json(f"{path}/{META}")["metrics"]
            found.append((m[metric], m["epoch"], path))
    if not found:
        raise RuntimeError(f"no checkpoint with {metric!r} among {paths}")
    return best_by(found, mode)[2]


def fit(
    cfg: PipelineConfig, storage: Storage, dataset: DatasetVersion, run_id: str
) -> TrainOutcome:
    """Train, then evaluate the best checkpoint on the test split and write the run's history,
    test metrics and plots next to its checkpoints."""
    # "verbose": Ray Train's own logs too (`dcml -v`); the loop's epoch lines either way
    progress = True if console.quiet(cfg.cluster.quiet) else "verbose"
    result = build_trainer(cfg, storage, dataset, run_id, progress=progress).fit()
    run = run_folder(storage, run_id)
    # Ray's list of kept checkpoints, not every folder: a run killed while uploading can leave a
    # folder that its checkpoint manager never registered.
    kept = [c.path for c, _ in result.best_checkpoints or []]
    path = best_checkpoint(storage, kept, cfg.train.metric, cfg.train.mode)
    test, y, out = evaluate_checkpoint(storage, dataset, path, "test")
    storage.write_json(f"{run}/{TEST_METRICS}", {"checkpoint": path, **test})
    history = publish_history(storage, run, result.checkpoint.path)
    importance = permutation_importance(storage, dataset, path, seed=cfg.seed)
    storage.write_json(f"{run}/{IMPORTANCE}", importance)
    gain = None
    spec = storage.read_json(f"{path}/{META}")["model_spec"]
    if spec.get("kind") == "gbdt":
        from dcml.train.booster import gain_importance

        gain = gain_importance(read_weights(storage, path, spec), dataset.manifest["features"])
        storage.write_json(f"{run}/{GAIN}", gain)
    metrics = storage.read_json(f"{path}/{META}")["metrics"]
    kept = metrics.get("best_round")  # gbdt: the round its model ends at
    write_plots(storage, run, history, cfg.train.metric, dataset, y, out, importance, gain, kept)
    return TrainOutcome(run_id, path, metrics, {f"test_{k}": v for k, v in test.items()})


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
