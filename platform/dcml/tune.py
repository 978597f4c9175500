"""The tune stage: a Ray Tune sweep over learning rate and depth, with ASHA early stopping.

Each trial is a small Tune function that builds its `TorchTrainer` with the same `build_trainer`
as `dcml train`; Train's `TuneReportCallback` forwards every epoch's metrics to Tune, so ASHA sees
each epoch and can stop bad trials early.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcml.config import PipelineConfig, parse_config
from dcml.data.preprocess import DatasetVersion
from dcml.storage import Storage
from dcml.train.loop import META
from dcml.train.trainer import best_checkpoint


@dataclass(frozen=True)
class SweepOutcome:
    sweep_id: str
    checkpoint_path: str
    metrics: dict[str, Any]
    params: dict[str, Any]
    trials: list[dict[str, Any]]  # one row per trial, best first


def search_space(cfg: PipelineConfig) -> dict[str, Any]:
    from ray import tune

    return {
        "train.lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max),
        "model.depth": tune.choice(cfg.tune.depths),
    }


def with_params(cfg: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """A copy of cfg with dotted-path values set, validated like any config."""
    raw = cfg.model_dump()
    for path, value in params.items():
        node = raw
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_config(raw, source="trial config")


def _trial(
    params: dict[str, Any],
    base: dict[str, Any],
    storage_args: tuple,
    dataset: DatasetVersion,
    trials_path: str,
) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dcml.train.trainer import build_trainer

    cfg = with_params(PipelineConfig.model_validate(base), params)
    trainer = build_trainer(
        cfg,
        Storage(*storage_args),
        dataset,
        tune.get_context().get_trial_id(),
        storage_path=trials_path,
        workers=cfg.tune.workers_per_trial,
        epochs=cfg.tune.epochs,
        callbacks=[TuneReportCallback()],
        progress=False,
    )
    trainer.fit()


def sweep(
    cfg: PipelineConfig, storage: Storage, dataset: DatasetVersion, sweep_id: str, log=print
) -> SweepOutcome:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    metric, mode = cfg.train.metric, cfg.train.mode
    sweep_path = storage.path("runs", sweep_id)
    trainable = tune.with_parameters(
        _trial,
        base=cfg.model_dump(),
        storage_args=(storage.uri(), storage.options),
        dataset=dataset,
        trials_path=f"{sweep_path}/trials",
    )
    tuner = tune.Tuner(
        # The trial itself only waits on its trainer; its Train workers hold the real CPUs.
        tune.with_resources(trainable, {"cpu": 0.01}),
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=cfg.tune.num_samples,
            search_alg=BasicVariantGenerator(
                random_state=cfg.seed, max_concurrent=cfg.tune.max_concurrent_trials
            ),
            scheduler=ASHAScheduler(
                max_t=cfg.tune.epochs,
                grace_period=min(cfg.tune.grace_period, cfg.tune.epochs),
                reduction_factor=2,
            ),
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=storage.path("runs"),
            storage_filesystem=storage.arrow_fs(),
            verbose=0,
        ),
    )
    log(f"tuning: {cfg.tune.num_samples} trials over train.lr and model.depth with ASHA ...")
    grid = tuner.fit()

    trials, best_row = [], None
    sign = 1 if mode == "max" else -1
    for result in grid:
        df = result.metrics_dataframe
        row = {
            "trial": (result.metrics or {}).get("trial_id", "?"),
            **{k: result.config.get(k) for k in ("train.lr", "model.depth")},
            "epochs": 0,
            metric: float("nan"),
            "error": str(result.error).strip().splitlines()[-1][:120] if result.error else "",
        }
        if df is not None and metric in df and "checkpoint_path" in df:
            row["epochs"] = int(df["training_iteration"].max())
            df = df[df["checkpoint_path"].notna() & df[metric].notna()]
        if df is not None and len(df) and metric in df:
            i = (sign * df[metric]).idxmax()
            row[metric] = float(df[metric][i])
            if best_row is None or sign * row[metric] > best_row[0]:
                best_row = (sign * row[metric], row["trial"], result.config)
        trials.append(row)
    if best_row is None:
        raise RuntimeError(
            f"sweep {sweep_id}: no trial reported {metric}; errors: "
            f"{[t['error'] for t in trials if t['error']]}"
        )
    trials.sort(key=lambda r: -sign * r[metric] if r[metric] == r[metric] else float("inf"))
    ckpt = best_checkpoint(storage, f"{sweep_path}/trials/{best_row[1]}", metric, mode)
    meta = storage.read_json(f"{ckpt}/{META}")
    return SweepOutcome(sweep_id, ckpt, meta["metrics"], dict(best_row[2]), trials)


def format_trials(trials: list[dict[str, Any]], metric: str) -> str:
    lines = [f"{'trial':<13}{'lr':>10}{'depth':>7}{'epochs':>8}{metric:>14}  error"]
    for t in trials:
        lines.append(
            f"{t['trial']:<13}{t['train.lr']:>10.2e}{t['model.depth']:>7}{t['epochs']:>8}"
            f"{t[metric]:>14.4f}  {t['error']}"
        )
    return "\n".join(lines)
