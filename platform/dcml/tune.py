"""The tune stage: a Ray Tune sweep over any config fields, with ASHA early stopping by default.

Each trial is a small Tune function that builds its `TorchTrainer` with the same `build_trainer`
as `dcml train`; Train's `TuneReportCallback` forwards every epoch's metrics to Tune, so ASHA sees
each epoch and can stop bad trials early. A sweep's files live under runs/<sweep_id>/: Tune's
experiment state (for `--resume`), `run.json` (dataset and config), `trials/<trial_id>/` (each
trial's Train run and checkpoints), `trials.csv` / `trials.parquet` and `plots/`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from dcml import console
from dcml.config import ConfigError, PipelineConfig, with_values
from dcml.config_model import reads, sweep_families, sweep_problem
from dcml.data.catalog import DatasetVersion
from dcml.direction import best_by
from dcml.layout import META, run_folder
from dcml.storage import Storage
from dcml.train.session import PBT_STEP

TRIAL_CPU = 0.01  # the trial function only waits on its trainer; Train workers hold the CPUs


@dataclass(frozen=True)
class SweepOutcome:
    sweep_id: str
    checkpoint_path: str
    metrics: dict[str, Any]
    params: dict[str, Any]
    trials: list[dict[str, Any]]  # one row per trial, best first


def search_space(cfg: PipelineConfig) -> dict[str, Any]:
    """`tune.space` as Ray Tune's param_space (keys stay dotted config paths)."""
    from ray import tune

    space = {}
    for path, spec in cfg.tune.space.items():
        kind, v = next(iter(spec.items()))
        if kind == "loguniform":
            space[path] = tune.loguniform(v[0], v[1])
        elif kind == "uniform":
            space[path] = tune.uniform(v[0], v[1])
        elif kind == "randint":
            space[path] = tune.randint(v[0], v[1] + 1)  # both ends included
        elif kind == "grid" or cfg.tune.searcher == "grid":
            space[path] = tune.grid_search(list(v))
        else:
            space[path] = tune.choice(list(v))
    return space


def check_sweep(cfg: PipelineConfig) -> None:
    """Refuse, before any trial starts, a sweep whose trials would all be the same, or that
    needs XGBoost where it is not installed."""
    problem = sweep_problem(cfg.tune.space, cfg.model.family)
    if problem:
        raise ConfigError(problem)
    if "gbdt" in sweep_families(cfg.tune.space, cfg.model.family):
        from dcml.train.booster import require_xgboost

        require_xgboost()


def trial_config(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """A trial's config: the sweep's with the trial's parameters set, and its epoch budget
    (`tune.epochs`) as `train.epochs`, the one budget the loop and its schedule read."""
    return with_values(base, {**params, "train.epochs": base.tune.epochs}, "trial config")


def gbdt_reports(cfg: PipelineConfig) -> int | None:
    """A gbdt trial's rounds per report: its rounds cut into at most tune.epochs reports, the
    unit ASHA counts (None for an MLP trial, which reports every epoch)."""
    if cfg.model.family != "gbdt":
        return None
    return max(1, math.ceil(cfg.model.gbdt.rounds / cfg.tune.epochs))


def concurrency(cfg: PipelineConfig) -> int:
    """Trials at once: what `tune.max_cpus`/`max_gpus` (default: the cluster) hold, capped by
    `tune.max_concurrent_trials`."""
    import ray

    t = cfg.tune
    res = ray.cluster_resources()
    cpus = res.get("CPU", 0)
    per_trial = cfg.train.cpus_per_worker  # an inline trial trains in its own process
    if not inline(cfg):  # Train workers hold the CPUs; the trial only waits on them
        per_trial = t.workers_per_trial * cfg.train.cpus_per_worker + TRIAL_CPU
    budget = t.max_cpus if t.max_cpus is not None else (cpus - 1 if cpus > 2 else cpus)
    n = math.floor(budget / per_trial + 1e-9)
    if cfg.train.use_gpu:
        gpus = t.max_gpus if t.max_gpus is not None else res.get("GPU", 0)
        n = min(n, math.floor(gpus / t.workers_per_trial + 1e-9))
    if n < 1:
        raise ValueError(
            f"tune: a trial needs {per_trial:g} CPUs ({t.workers_per_trial} worker(s) x "
            f"train.cpus_per_worker={cfg.train.cpus_per_worker})"
            + (" and GPUs" if cfg.train.use_gpu else "")
            + f" but the sweep may hold {budget:g} (tune.max_cpus, or the cluster's)"
        )
    return min(n, t.max_concurrent_trials or n)


def _trial(
    params: dict[str, Any],
    base: PipelineConfig,
    storage: Storage,
    dataset: DatasetVersion,
    trials_path: str,
) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dcml.train.trainer import build_trainer

    cfg = trial_config(base, params)
    trainer = build_trainer(
        cfg,
        storage,
        dataset,
        # the trial id names the Train run: a resumed sweep's trial resumes its own run
        tune.get_context().get_trial_id(),
        storage_path=trials_path,
        workers=cfg.tune.workers_per_trial,
        callbacks=[TuneReportCallback()],
        progress=False,
        report_every=gbdt_reports(cfg),
    )
    trainer.fit()


def inline(cfg: PipelineConfig) -> bool:
    """Whether a trial runs the training loop in its own process (one worker, its split cached)
    instead of starting a Ray Train run: that saves Ray Train's 10-20 s of start-up per trial,
    and PBT needs it (it copies the trials' own Tune checkpoints between them)."""
    return cfg.tune.workers_per_trial == 1 and cfg.train.cache != "none"


def _inline_trial(
    params: dict[str, Any], base: PipelineConfig, storage: Storage, dataset: DatasetVersion
) -> None:
    """A one-worker trial: the training loop in this process, with Tune's own checkpoints."""
    import pyarrow as pa
    import torch

    from dcml.train.ingest import split_tables
    from dcml.train.loop import train_func
    from dcml.train.session import LocalSplit, TrialSession
    from dcml.train.trainer import loop_config

    cfg = trial_config(base, params)
    splits = {
        s: LocalSplit(pa.concat_tables(split_tables(storage, dataset, s)))
        for s in ("train", "validation")
    }
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    config = loop_config(cfg, storage, dataset, progress=False)
    if cfg.model.family == "gbdt":
        from dcml.train.gbdt import gbdt_train_func

        config["report_every"] = gbdt_reports(cfg)
        gbdt_train_func(config, TrialSession(splits, device, cfg.model.gbdt.rounds))
    else:
        train_func(config, TrialSession(splits, device, cfg.train.epochs))


def _mutations(cfg: PipelineConfig) -> dict[str, Any]:
    """PBT's perturbations: the search space, with grids as plain lists of values."""
    space = search_space(cfg)
    for path, spec in cfg.tune.space.items():
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            space[path] = list(values)
    return space


def _searcher(cfg: PipelineConfig, limit: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.tune.searcher != "optuna":
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=limit)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise RuntimeError(
            "tune.searcher=optuna needs optuna: pip install 'dcml[tune]' (or optuna)"
        ) from e
    return ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=limit)


def sweep(
    cfg: PipelineConfig,
    storage: Storage,
    dataset: DatasetVersion,
    sweep_id: str,
    log=print,
    resume: bool = False,
) -> SweepOutcome:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    from dcml.tune_progress import TrialProgress

    # Save the experiment state often: a killed driver then loses little on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune's newer console output prints a banner even at verbose=0; dcml prints its own table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Keeping the best N checkpoints makes Tune save its state at every checkpoint (which is what
    # lets --resume find them), and warn about it each time: keep the saves, drop the warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    metric, mode = cfg.train.metric, cfg.train.mode
    check_sweep(cfg)
    sweep_path = run_folder(storage, sweep_id)
    common = {"base": cfg, "storage": storage, "dataset": dataset}
    checkpoints = None
    if inline(cfg):
        gpu = 1 if cfg.train.use_gpu else 0
        trainable = tune.with_resources(
            tune.with_parameters(_inline_trial, **common),
            {"cpu": cfg.train.cpus_per_worker, "gpu": gpu},
        )
        if cfg.tune.scheduler != "pbt":  # PBT keeps every checkpoint it may copy
            checkpoints = tune.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            )
    else:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, trials_path=f"{sweep_path}/trials", **common),
            {"cpu": TRIAL_CPU},
        )
    limit = concurrency(cfg)
    # the trials as they report (a resumed sweep has the one stored with it)
    params = list(cfg.tune.space)
    progress = TrialProgress(metric, params, cfg.tune.epochs, format_trials, cfg.model.family)
    if resume:
        tuner = tune.Tuner.restore(
            sweep_path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,  # a trial that failed (bad hyperparameters) stays failed
            storage_filesystem=storage.arrow_fs(),
        )
        log(f"resuming sweep {sweep_id}: finished trials are kept, unfinished ones go on")
    else:
        scheduler = FIFOScheduler()
        if cfg.tune.scheduler == "asha":
            scheduler = ASHAScheduler(
                max_t=cfg.tune.epochs,
                grace_period=min(cfg.tune.grace_period, cfg.tune.epochs),
                reduction_factor=cfg.tune.reduction_factor,
            )
        elif cfg.tune.scheduler == "pbt":
            scheduler = PopulationBasedTraining(
                time_attr=PBT_STEP,
                require_attrs=False,  # the last epoch's result has no PBT_STEP
                perturbation_interval=cfg.tune.perturbation_interval,
                hyperparam_mutations=_mutations(cfg),
                # synchronous: every trial reaches the step before the worst copy the best, so
                # trials that wait for a CPU are compared too (and a sweep is reproducible)
                synch=True,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=cfg.tune.num_samples,
                search_alg=_searcher(cfg, limit),
                scheduler=scheduler,  # the searcher holds the concurrency limit
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=sweep_id,
                storage_path=run_folder(storage),
                storage_filesystem=storage.arrow_fs(),
                checkpoint_config=checkpoints,
                verbose=0,
                callbacks=[progress],
            ),
        )
        log(
            f"tuning: {cfg.tune.searcher} search over {', '.join(cfg.tune.space)} "
            f"({cfg.tune.num_samples} sample(s)), scheduler {cfg.tune.scheduler}, "
            f"{limit} trial(s) at once of {cfg.tune.workers_per_trial} worker(s)"
        )
    try:
        grid = tuner.fit()
    finally:
        progress.board.close()
    return _collect(cfg, storage, sweep_id, grid)


def _collect(cfg: PipelineConfig, storage: Storage, sweep_id: str, grid) -> SweepOutcome:
    """One row per trial (best first), the trials as CSV/Parquet and plots; the best checkpoint."""
    metric, mode = cfg.train.metric, cfg.train.mode
    sweep_path = run_folder(storage, sweep_id)
    trials, curves, kept = [], {}, []
    for result in grid:
        df = result.metrics_dataframe
        found = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(str(result.path)))
        # the folder names the trial: a PBT trial's last result can carry the id of the trial
        # whose checkpoint it took
        trial_id = found[1] if found else (result.metrics or {}).get("trial_id", "?")
        family = result.config.get("model.family", cfg.model.family)
        row = {
            "trial": trial_id,
            "family": family,
            # a value the trial's family does not read is None (blank in trials.csv, unplotted)
            **{k: result.config.get(k) if reads(k, family) else None for k in cfg.tune.space},
            "epochs": 0,
            "seconds": None,
            metric: float("nan"),
            "status": "failed" if result.error else "finished",
            "error": _last_line(result.error) if result.error else "",
        }
        if df is not None and "time_total_s" in df:  # from the trial's start to its last report
            row["seconds"] = round(float(df["time_total_s"].max()), 3)
        budget = cfg.tune.epochs
        if df is not None and metric in df:
            row["epochs"] = int(df["epoch"].max()) + 1 if "epoch" in df else len(df)
            curves[trial_id] = (list(range(1, len(df) + 1)), list(df[metric]))  # per report
            if "rounds_budget" in df:  # gbdt: epochs counts rounds
                budget = int(df["rounds_budget"].max())
        found = _best_kept(storage, result, metric, mode)
        if found is not None:
            row[metric] = found[0]
            kept.append((found[0], 0, found[1], result.config))
        finished = df is not None and "finished" in df and bool(df["finished"].max() == 1)
        if not result.error and row["epochs"] < budget and not finished:
            row["status"] = "stopped early"
        trials.append(row)
    sign = 1 if mode == "max" else -1  # best first, trials without a value last
    trials.sort(key=lambda r: -sign * r[metric] if r[metric] == r[metric] else math.inf)
    _write_results(storage, sweep_path, trials, curves, cfg)
    if not kept:
        raise RuntimeError(
            f"sweep {sweep_id}: no trial reported {metric}; errors: "
            f"{[t['error'] for t in trials if t['error']]}"
        )
    _, _, ckpt, config = best_by(kept, mode)
    meta = storage.read_json(f"{ckpt}/{META}")
    family = config.get("model.family", cfg.model.family)  # the values its family reads
    params = {k: config[k] for k in cfg.tune.space if reads(k, family)}
    return SweepOutcome(sweep_id, ckpt, meta["metrics"], params, trials)


def _best_kept(storage: Storage, result, metric: str, mode: str) -> tuple[float, str] | None:
    """A trial's best stored checkpoint: (metric, path). Train-run trials report the paths of
    their Train checkpoints as `checkpoint_path`; PBT trials keep Tune checkpoints."""
    found = []
    df = result.metrics_dataframe
    if df is not None and "checkpoint_path" in df and metric in df:
        rows = df[df["checkpoint_path"].notna() & df[metric].notna()]
        found += [(r[metric], r["epoch"], r["checkpoint_path"]) for _, r in rows.iterrows()]
    for checkpoint, m in result.best_checkpoints or []:
        if m.get(metric) == m.get(metric) and metric in m:
            found.append((m[metric], m.get("epoch", 0), checkpoint.path))
    # The Train run keeps only its best checkpoints: skip paths it has deleted since.
    found = [f for f in found if storage.exists(f"{f[2]}/{META}")]
    if not found:
        return None
    value, _, path = best_by(found, mode)
    return float(value), path


def _last_line(error: BaseException) -> str:
    return console.last_line(str(error)) or type(error).__name__


def _write_results(storage: Storage, sweep_path: str, trials, curves, cfg: PipelineConfig) -> None:
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from dcml import plots

    table = pa.Table.from_pylist([{k: _cell(v) for k, v in t.items()} for t in trials])
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    with storage.fs.open(f"{sweep_path}/trials.csv", "wb") as f:
        f.write(buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with storage.fs.open(f"{sweep_path}/trials.parquet", "wb") as f:
        f.write(buf.getvalue())

    metric = cfg.train.metric
    log_scale = [p for p, spec in cfg.tune.space.items() if "loguniform" in spec]
    params = list(cfg.tune.space)
    images = {
        "metric_by_param.png": plots.metric_by_param(trials, params, metric, log_scale),
        "trial_curves.png": plots.trial_curves(curves, metric, _report_unit(cfg)),
    }
    storage.fs.makedirs(f"{sweep_path}/plots", exist_ok=True)
    for name, data in images.items():
        with storage.fs.open(f"{sweep_path}/plots/{name}", "wb") as f:
            f.write(data)


def _report_unit(cfg: PipelineConfig) -> str:
    """What one report of a trial is: an epoch, or for gbdt a share of its rounds."""
    if cfg.model.family == "mlp" and "model.family" not in cfg.tune.space:
        return "epoch"
    return f"report (an epoch, or 1/{cfg.tune.epochs} of a gbdt trial's rounds)"


def _cell(value: Any) -> Any:
    """A value for one table column: lists (e.g. widths) as text."""
    return str(value) if isinstance(value, list | dict) else value


def format_trials(trials: list[dict[str, Any]], metric: str, params: list[str]) -> str:
    """The trials as a table: after a sweep, and redrawn while it runs (tune_progress). A value
    that the trial's model family does not read shows as "-"; a gbdt trial's epochs are its
    rounds."""
    widths = [max(14, len(p) + 2) for p in params]
    head = f"{'trial':<13}" + "".join(f"{p:>{w}}" for p, w in zip(params, widths))
    lines = [head + f"{'epochs':>8}{metric:>14}  status"]
    for t in trials:
        family = t.get("family", "mlp")
        cells = "".join(
            f"{_show(t[p]) if reads(p, family) else '-':>{w}}" for p, w in zip(params, widths)
        )
        status = t["status"] + (f": {t['error']}" if t["error"] else "")
        lines.append(f"{t['trial']:<13}{cells}{t['epochs']:>8}{t[metric]:>14.4f}  {status}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
