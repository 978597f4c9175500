"""The stages as functions, and the whole pipeline read top to bottom like the seed's flow chart:

    collect -> preprocess -> gate -> store -> train -> tune -> register -> deploy -> infer -> output

Each stage takes the config and references (dataset version, model version) and writes under the
storage root, so each can also run alone from the CLI or a job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dcml import registry, tracking
from dcml.cluster import connect
from dcml.config import (
    ConfigError,
    PipelineConfig,
    public_dump,
    with_overrides,
    with_secrets,
)
from dcml.data.catalog import DatasetVersion, read_split_numpy, require_dataset, resolve_dataset
from dcml.data.clean import ReadAndClean
from dcml.data.columns import Columns, class_key
from dcml.data.preprocess import preprocess
from dcml.data.reference import prediction_reference
from dcml.direction import best_by
from dcml.layout import META, RUN_JSON, read_weights, run_folder
from dcml.predictor import Predictor
from dcml.report import write_report
from dcml.storage import Storage, to_json
from dcml.train.metrics import choose_threshold, task_metrics
from dcml.train.step import evaluate
from dcml.train.trainer import TrainOutcome, check_resources, fit, loss_of, new_run_id

Log = Callable[[str], None]


def stage_preprocess(cfg: PipelineConfig, log: Log = print) -> DatasetVersion:
    connect(cfg.cluster)
    return preprocess(cfg, Storage.from_config(cfg), log)


def resumed_config(cfg: PipelineConfig, run_id: str, overrides: list[str] | None = None):
    """The config a run was started with (found under `cfg`'s storage root), plus overrides
    (e.g. `train.epochs=40` to train on)."""
    storage = Storage.from_config(cfg)
    record = f"{run_folder(storage, run_id)}/{RUN_JSON}"
    if not storage.exists(record):
        raise LookupError(f"no run {run_id!r} to resume under {storage.uri('runs')}")
    raw = with_secrets(storage.read_json(record)["config"], cfg)
    resumed = with_overrides(raw, overrides, f"run {run_id}")
    family = raw.get("model", {}).get("family", "mlp")
    if resumed.model.family != family:  # its checkpoints hold the other family's model
        raise ConfigError(
            f"model.family: run {run_id} trained {family}; a resumed run keeps its family"
        )
    return resumed


def _open_run(
    cfg: PipelineConfig,
    storage: Storage,
    run_id: str,
    dataset_ref: str | None,
    resume: bool,
    verb: str,
) -> DatasetVersion:
    """The dataset of a new run (recorded in runs/<run_id>/run.json with its config) or of the
    stored run that `resume` continues. An existing id is never started over."""
    record = f"{run_folder(storage, run_id)}/{RUN_JSON}"
    exists = ValueError(
        f"run {run_id!r} exists: `dcml {verb} --resume {run_id}` continues it; "
        "choose another id to start a new one"
    )
    if storage.exists(record):
        if not resume:
            raise exists
        dataset_ref = storage.read_json(record)["dataset"]
    elif resume:
        raise LookupError(f"no run {run_id!r} to resume under {storage.uri('runs')}")
    dataset = resolve_dataset(storage, dataset_ref or cfg.data.name)
    require_dataset(storage, dataset, full=cfg.storage.verify)
    if not resume:
        started = {
            "run_id": run_id,
            "kind": verb,
            "dataset": dataset.ref,
            "config": public_dump(cfg),
            "created_at": time.time(),
        }
        try:  # exclusive: two jobs given one new run id cannot both start it
            storage.create(record, to_json(started).encode())
        except FileExistsError:
            raise exists from None
    return dataset


def stage_train(
    cfg: PipelineConfig,
    dataset_ref: str | None = None,
    run_id: str | None = None,
    log: Log = print,
    resume: bool = False,
) -> tuple[DatasetVersion, TrainOutcome]:
    """Train on a dataset version; `resume` continues a stored run from its last checkpoint."""
    if cfg.model.family == "gbdt":  # before Ray starts, and before the run is recorded
        from dcml.train.booster import require_xgboost

        require_xgboost()
    connect(cfg.cluster)
    check_resources(cfg, cfg.train.workers)  # a run that cannot start leaves no run.json
    storage = Storage.from_config(cfg)
    run_id = run_id or new_run_id("train")
    dataset = _open_run(cfg, storage, run_id, dataset_ref, resume, "train")
    budget = f"{cfg.train.workers} DDP worker(s), {cfg.train.epochs} epochs"
    if cfg.model.family == "gbdt":
        budget = f"{cfg.train.workers} XGBoost worker(s), up to {cfg.model.gbdt.rounds} rounds"
    log(f"{'resuming' if resume else 'training'} on {dataset.ref}: {budget}, run {run_id}")
    outcome = fit(cfg, storage, dataset, run_id)
    tracking.log_training(cfg, storage, run_id, log)
    test = {k.removeprefix("test_"): v for k, v in outcome.test_metrics.items()}
    m = outcome.metrics
    best = f"round {m['best_round']}" if "best_round" in m else f"epoch {m['epoch'] + 1}"
    log(
        f"best checkpoint: {best}, "
        f"{cfg.train.metric}={outcome.metrics[cfg.train.metric]:.4f}; test {format_metrics(test)}"
        f"\nrun outputs (history.csv, test_metrics.json, plots/): "
        f"{storage.uri('runs', run_id)}"
    )
    return dataset, outcome


def stage_tune(
    cfg: PipelineConfig,
    dataset_ref: str | None = None,
    sweep_id: str | None = None,
    log: Log = print,
    resume: bool = False,
):
    """A sweep on a dataset version; `resume` continues a stored sweep that was interrupted."""
    from dcml.tune import format_trials, sweep

    connect(cfg.cluster)
    storage = Storage.from_config(cfg)
    sweep_id = sweep_id or new_run_id("sweep")
    dataset = _open_run(cfg, storage, sweep_id, dataset_ref, resume, "tune")
    outcome = sweep(cfg, storage, dataset, sweep_id, log, resume)
    tracking.log_sweep(cfg, storage, sweep_id, log)
    table = format_trials(outcome.trials, cfg.train.metric, list(cfg.tune.space))
    log(
        f"tuning results (best first):\n{table}\n"
        f"sweep outputs (trials.csv, trials.parquet, plots/): {storage.uri('runs', sweep_id)}"
    )
    return dataset, outcome


def stage_register(
    cfg: PipelineConfig,
    dataset: DatasetVersion,
    checkpoint_path: str,
    lineage: dict[str, Any],
    aliases: list[str],
    log: Log = print,
) -> registry.ModelVersion:
    """Register a checkpoint with its preprocessor and its test-split metrics. A sweep trial's
    checkpoint (`lineage` holds its `params`) is registered with that trial's config: its
    family, loss and threshold policy, and the config stored with it."""
    if lineage.get("params"):
        from dcml.tune import trial_config

        cfg = trial_config(cfg, lineage["params"])
    storage = Storage.from_config(cfg)
    ckpt_meta = storage.read_json(f"{checkpoint_path}/{META}")
    meta = {
        "task": dataset.manifest["task"],
        "classes": dataset.manifest["classes"],
        "features": dataset.manifest["features"],
        "preprocessor": dataset.manifest["preprocessor"],
        "model_spec": ckpt_meta["model_spec"],
        "validation_metrics": ckpt_meta["metrics"],
        "lineage": {
            "dataset": dataset.ref,
            "checkpoint": checkpoint_path,
            "seed": cfg.seed,
            **lineage,
        },
        "config": public_dump(cfg),
    }
    # Test metrics of exactly what gets registered (weights + preprocessor through the
    # Predictor), with the test twin of every metric `train.metric` can name (loss included).
    predictor = Predictor(read_weights(storage, checkpoint_path, meta["model_spec"]), meta)
    task = dataset.manifest["task"]
    threshold = 0.5
    if task == "binary":  # the decision threshold, chosen on the validation split
        _, x_val, y_val = read_split_numpy(storage, dataset, "validation")
        t = cfg.train
        p_val = predictor.predict_features(x_val)
        threshold = choose_threshold(t.threshold, y_val, p_val, t.costs.fp, t.costs.fn)
        meta["threshold"], meta["threshold_policy"] = threshold, str(t.threshold)
    _, x, y = read_split_numpy(storage, dataset, "test")
    loss_fn = loss_of(cfg, dataset.manifest)
    meta["metrics"] = evaluate(
        predictor.model, torch.as_tensor(x), y, task, loss_fn, "test_", threshold
    )
    # what `dcml monitor` compares served predictions with
    outputs = predictor.predict_features(x)
    meta["reference_predictions"] = prediction_reference(task, outputs, predictor.classes)
    if task == "binary":  # the test ROC curve and where the threshold puts the model on it
        meta["test_roc"] = roc_summary(y, outputs, threshold)
    test = {k.removeprefix("test_"): v for k, v in meta["metrics"].items()}
    mv = registry.register(storage, cfg.name, checkpoint_path, meta)
    log(f"registered model {mv.ref} at {storage.to_uri(mv.path)}: test {format_metrics(test)}")
    for alias in aliases:
        try:
            registry.set_alias(storage, cfg.name, alias, mv.version)
            log(f"{cfg.name}@{alias} -> {mv.version}")
        except registry.PromotionRefused as e:  # the alias keeps its better version
            log(f"warning: {e}")
    tracking.log_registration(cfg, storage, mv, log)
    return mv


def roc_summary(y: np.ndarray, p: np.ndarray, threshold: float, points: int = 101) -> dict:
    """The ROC curve (at most `points` points) and the (FPR, TPR) the threshold gives."""
    from dcml.plots import roc_points

    fpr, tpr = roc_points(y, p)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).astype(int))
    positive = np.asarray(p) >= threshold
    y = np.asarray(y).astype(bool)
    at = [
        float((positive & ~y).sum() / max((~y).sum(), 1)),
        float((positive & y).sum() / max(y.sum(), 1)),
    ]
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "at_threshold": at}


def format_metrics(metrics: dict[str, float]) -> str:
    shown = ["accuracy", "roc_auc", "macro_f1", "rmse", "mae", "r2"]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics)


def raw_test_rows(
    cfg: PipelineConfig, dataset: DatasetVersion, limit: int | None = None
) -> pa.Table:
    """Raw (untransformed) rows of the test split, as a client would send them.

    The source files are read and cleaned again with the same code, which gives every row the
    same id and split as in preprocessing; the label comes back as its class index.
    """
    m = dataset.manifest
    d = cfg.data
    storage = Storage.from_config(cfg)
    options = (
        storage.options
        if d.storage_options is None or m["source"].startswith("bundled:")
        else d.storage_options
    )
    fs = fsspec.core.url_to_fs(m["source_files"][0], **options)[0]
    cols = Columns(**m["columns"])
    clean = ReadAndClean(
        fs,
        m["source_files"],
        m["format"],
        cols,
        m["config"]["seed"],
        m["config"]["data"]["split"],
        "none",
        "drop",
    )
    keys = [class_key(c) for c in m["classes"] or []]
    parts, n = [], 0
    for i in range(len(m["source_files"])):
        t = clean.read(i)
        t = t.filter(pc.and_(pc.equal(t.column("_split"), 2), pc.equal(t.column("_drop"), 0)))
        label = (
            pc.index_in(t.column("_label"), value_set=pa.array(keys, pa.string()))
            if keys
            else t.column("_label")
        )
        parts.append(t.select(["id", *cols.features]).append_column("label", label))
        n += t.num_rows
        if limit and n >= limit:
            break
    table = pa.concat_tables(parts)
    return table.slice(0, limit) if limit else table


@dataclass
class PipelineResult:
    dataset: DatasetVersion
    model: registry.ModelVersion
    url: str
    served_metrics: dict[str, float]
    demo: list[dict[str, Any]] = field(default_factory=list)
    report: str = ""  # URI of runs/<run_id>/report.html


def served_token(cfg: PipelineConfig) -> str | None:
    """The bearer token the deployed app requires, as this process can read it (None: none)."""
    from dcml.http_app import bearer_token

    return bearer_token(cfg.serve).value


def query_served_model(
    url: str,
    table: pa.Table,
    features: list[str],
    token: str | None = None,
    batch: int = 64,
    task: str = "binary",
    classes: list | None = None,
    threshold: float = 0.5,
) -> tuple[dict[str, float], list[dict]]:
    """POST raw test rows to /predict over HTTP; metrics of the answers against the true labels
    (binary: labelled from `threshold`, the served version's).

    `table` holds the input columns, `id` and `label` (the class index, or the regression target).
    """
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows = table.to_pylist()
    probs, answered = [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        payload = [{c: _json_value(r[c]) for c in features} for r in chunk]
        resp = requests.post(f"{url}/predict", json=payload, headers=headers, timeout=30)
        resp.raise_for_status()
        for r, p in zip(chunk, resp.json()["predictions"], strict=True):
            if task == "multiclass":
                probs.append([p["probabilities"][str(c)] for c in classes or []])
            else:
                probs.append(p["value"] if task == "regression" else p["probability"])
            true = r["label"] if task == "regression" else (classes or [0, 1])[r["label"]]
            answered.append({"id": r["id"], "true": true, **p})
    y = np.array([r["label"] for r in rows])
    return task_metrics(task, y, np.array(probs), threshold), answered


def _json_value(value: Any) -> Any:
    """A raw value as JSON can carry it: a missing number (NaN) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_pipeline(
    cfg: PipelineConfig, log: Log = print, keep_serving: bool = False
) -> PipelineResult:
    from ray import serve

    from dcml.serving import deploy

    if cfg.tune.enabled:  # before any stage: a sweep that cannot run stops the pipeline here
        from dcml.tune import check_sweep

        check_sweep(cfg)
    connect(cfg.cluster)
    storage = Storage.from_config(cfg)
    log(f"storage root: {storage.uri()}")

    dataset = stage_preprocess(cfg, log)  # collect, clean, split, fit, gate, store
    _, trained = stage_train(cfg, dataset.ref, log=log)
    # (validation metric, tiebreak, checkpoint, lineage): the trained run wins a tie
    candidates = [
        (trained.metrics[cfg.train.metric], 1, trained.checkpoint_path, {"run_id": trained.run_id})
    ]
    if cfg.tune.enabled:
        _, swept = stage_tune(cfg, dataset.ref, log=log)
        lineage = {"sweep_id": swept.sweep_id, "params": swept.params}
        candidates.append((swept.metrics[cfg.train.metric], 0, swept.checkpoint_path, lineage))
    value, _, checkpoint, lineage = best_by(candidates, cfg.train.mode)
    log(f"best validation {cfg.train.metric}={value:.4f} from {lineage}")
    model = stage_register(cfg, dataset, checkpoint, lineage, ["production"], log)

    token = served_token(cfg)  # before deploying: an unset variable or missing file stops here
    url = deploy(cfg, f"{cfg.name}@production")
    served = registry.resolve_model(storage, f"{cfg.name}@production")
    log(f"serving {served.ref} (alias production) at {url}/predict")
    table = raw_test_rows(cfg, dataset)
    m = dataset.manifest
    threshold = served.meta.get("threshold", 0.5)
    metrics, answered = query_served_model(
        url, table, dataset.preprocessor.inputs, token, 64, m["task"], m["classes"], threshold
    )
    shown = answered[: cfg.serve.demo_rows]
    if shown:
        score = "value" if "value" in shown[0] else "probability"
        log(f"{'id':>6} {'true':>8} {'pred':>8} {score:>12}")
        for a in shown:
            pred = a.get("label", a.get("value"))
            log(f"{a['id']!s:>6} {a['true']!s:>8} {pred!s:>8} {a[score]:>12.4f}")
    log(
        f"served model on the test split ({len(answered)} rows over HTTP): "
        + format_metrics(metrics)
    )
    report = write_report(
        storage,
        trained.run_id,
        dataset=dataset,
        sweep_id=swept.sweep_id if cfg.tune.enabled else None,
        model=model,
        served=served,
        url=url,
        served_metrics=metrics,
    )
    tracking.log_report(cfg, storage, trained.run_id, log)
    result = PipelineResult(dataset, model, url, metrics, shown, report)
    log(
        "outputs:\n"
        f"  dataset  {storage.to_uri(dataset.path)}\n"
        f"  runs     {storage.uri('runs')}\n"
        f"  model    {storage.to_uri(model.path)}\n"
        f"  report   {report}"
    )
    if not keep_serving:
        serve.delete(cfg.serve.app_name)
    return result
