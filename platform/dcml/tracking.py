"""Experiment tracking: a mirror of dcml's runs, sweeps and model versions in MLflow.

dcml's own records stay the source of truth: after a stage, the driver copies what the stage
stored under the storage root to `tracking.mlflow_uri` (what goes where: docs/tracking.md). Only
the driver talks to MLflow (Ray workers may not reach it), and nothing here can fail a run: the
first error (mlflow not installed, an unreachable server, a rejected call) prints one warning and
turns tracking off for that URI for the rest of the process. `mlflow` is imported here only, and
only when a URI is set.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dcml import console, registry
from dcml.config import PipelineConfig
from dcml.layout import (
    HISTORY,
    META,
    PLOTS,
    REPORT,
    RUN_JSON,
    TEST_METRICS,
    read_trial_results,
    run_folder,
)
from dcml.storage import Storage, read_json_or_none

Log = Callable[[str], None]

# MLflow's limits on one log_batch call
PARAMS_PER_CALL, TAGS_PER_CALL, METRICS_PER_CALL = 100, 100, 1000
PARAM_CHARS = 6000
# Tune's bookkeeping in a trial's result.json: not the model's metrics
TUNE_KEYS = set(
    "epoch time timestamp training_iteration time_this_iter_s time_total_s time_since_restore "
    "iterations_since_restore pid pbt_step".split()
)
# a trial's status in trials.parquet -> its MLflow run status
RUN_STATUS = {"finished": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}

_off: set[str] = set()  # URIs that failed in this process: every later call skips them
_clients: dict[str, Any] = {}


def log_training(cfg: PipelineConfig, storage: Storage, run_id: str, log: Log = print) -> None:
    """Mirror a finished training run (runs/<run_id>/) as one MLflow run."""

    def mirror(client) -> None:
        experiment = _experiment(client, cfg)
        log(_where(cfg, experiment, _training(client, experiment, storage, run_id)))

    _guarded(cfg, log, mirror)


def log_sweep(cfg: PipelineConfig, storage: Storage, sweep_id: str, log: Log = print) -> None:
    """Mirror a finished sweep (runs/<sweep_id>/) as a parent run with a child run per trial."""

    def mirror(client) -> None:
        experiment = _experiment(client, cfg)
        log(_where(cfg, experiment, _sweep(client, experiment, storage, sweep_id)))

    _guarded(cfg, log, mirror)


def log_report(cfg: PipelineConfig, storage: Storage, run_id: str, log: Log = print) -> None:
    """Add runs/<run_id>/report.html to the MLflow run of that training run."""

    def mirror(client) -> None:
        found = _find(client, _experiment(client, cfg), run_id)
        if found is not None:
            path = f"{run_folder(storage, run_id)}/{REPORT}"
            _artifacts(client, found.info.run_id, storage, {REPORT: path})

    _guarded(cfg, log, mirror)


def log_registration(
    cfg: PipelineConfig, storage: Storage, mv: registry.ModelVersion, log: Log = print
) -> None:
    """Tag the MLflow run a model version came from with the version and its aliases."""

    def mirror(client) -> None:
        experiment = _experiment(client, cfg)
        lineage = mv.meta.get("lineage", {})
        found = _find(client, experiment, lineage.get("run_id") or lineage.get("sweep_id", ""))
        if found is None:  # not mirrored (tracking was off then)
            return
        runs = [found.info.run_id]
        checkpoint = lineage.get("checkpoint", "")
        for child in _children(client, experiment, found.info.run_id):
            trial = child.data.tags.get("dcml.trial")
            if trial and trial in checkpoint:  # the trial whose checkpoint was registered
                runs.append(child.info.run_id)
        tags = {"dcml.model_name": mv.name, "dcml.model_version": mv.ref}
        for run in runs:
            _log(client, run, tags=tags)
        _sync_aliases(client, experiment, storage, mv.name)

    _guarded(cfg, log, mirror)


def log_aliases(cfg: PipelineConfig, storage: Storage, name: str, log: Log = print) -> None:
    """After a promotion or rollback: every mirrored version of `name` gets its aliases as the
    registry now holds them (in `tracking.experiment`, default: the model's name)."""

    def mirror(client) -> None:
        experiment = _experiment(client, cfg, name, create=False)
        if experiment is not None:
            _sync_aliases(client, experiment, storage, name)

    _guarded(cfg, log, mirror)


# ---- the one guard: any failure is one warning, then tracking is off for that URI ----


def _guarded(cfg: PipelineConfig, log: Log, mirror: Callable[[Any], None]) -> None:
    uri = cfg.tracking.mlflow_uri
    if not uri or uri in _off:
        return
    try:
        mirror(_client(uri))
    except ImportError:
        _off.add(uri)
        log(
            f"warning: tracking.mlflow_uri={_shown(uri)} is set but mlflow is not installed "
            "(pip install 'dcml[mlflow]'); this process tracks nothing in MLflow"
        )
    except Exception as e:  # a mirror never fails the run it mirrors
        _off.add(uri)
        text = " ".join(str(e).split())[:300]
        log(
            f"warning: MLflow tracking at tracking.mlflow_uri={_shown(uri)} failed "
            f"({type(e).__name__}: {text}); this process tracks nothing more there (dcml's own "
            "records are complete)"
        )


def _client(uri: str):
    if uri in _clients:
        return _clients[uri]
    from mlflow.tracking import MlflowClient

    if not console.verbose():  # its notes on creating a database's tables
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    if urlsplit(uri).scheme in ("http", "https"):
        # MLflow retries a failed request with backoff for minutes by default (7 retries, 120 s
        # timeout): a mirror gives up sooner. A user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        _probe(uri)
    _clients[uri] = MlflowClient(tracking_uri=uri)
    return _clients[uri]


def _probe(uri: str) -> None:
    """Fail at once when nothing answers at the server (any HTTP answer will do)."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5)
    except requests.RequestException as e:
        raise ConnectionError(f"nothing answers there ({type(e).__name__})") from None


def _where(cfg: PipelineConfig, experiment: str, run: str) -> str:
    uri = _shown(cfg.tracking.mlflow_uri or "")
    if urlsplit(uri).scheme in ("http", "https"):  # the run's page in the MLflow UI
        return f"tracked in MLflow: {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run}"
    return f"tracked in MLflow: {uri}, experiment {experiment}, run {run}"


def _shown(uri: str) -> str:
    """The URI without a user or password in it."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


# ---- what is mirrored ----


def _training(client, experiment: str, storage: Storage, run_id: str) -> str:
    from dcml.train.checkpoint import parse_history

    run = run_folder(storage, run_id)
    record = storage.read_json(f"{run}/{RUN_JSON}")
    history = []
    if storage.exists(f"{run}/{HISTORY}"):
        history = parse_history(storage.read_bytes(f"{run}/{HISTORY}").decode())
    test = read_json_or_none(storage, f"{run}/{TEST_METRICS}", {})
    end = history[-1].get("time", time.time()) if history else time.time()
    mlrun = _open(client, experiment, record, storage)
    metrics = [
        _metric(k, v, row.get("time", end), int(row["epoch"]) + 1)
        for row in history
        for k, v in row.items()
        if k not in ("epoch", "time") and _number(v)
    ]
    metrics += [_metric(f"test_{k}", v, end, 0) for k, v in test.items() if _number(v)]
    tags = {}
    if test.get("checkpoint") and storage.exists(f"{test['checkpoint']}/{META}"):
        best = storage.read_json(f"{test['checkpoint']}/{META}")["metrics"]
        metric = record["config"]["train"]["metric"]
        metrics.append(_metric(f"best_{metric}", best[metric], end, 0))
        if "best_round" in best:  # gbdt: the round its model ends at
            metrics.append(_metric("best_round", int(best["best_round"]), end, 0))
        else:
            metrics.append(_metric("best_epoch", int(best["epoch"]) + 1, end, 0))
        tags["dcml.checkpoint"] = storage.to_uri(test["checkpoint"])
    _log(client, mlrun, metrics, tags=tags)
    files = {HISTORY: f"{run}/{HISTORY}", TEST_METRICS: f"{run}/{TEST_METRICS}"}
    files.update(_plots(storage, run))
    _artifacts(client, mlrun, storage, files)
    client.set_terminated(mlrun, "FINISHED", end_time=_ms(end))
    return mlrun


def _sweep(client, experiment: str, storage: Storage, sweep_id: str) -> str:
    import pyarrow.parquet as pq

    sweep = run_folder(storage, sweep_id)
    record = storage.read_json(f"{sweep}/{RUN_JSON}")
    trials = pq.read_table(io.BytesIO(storage.read_bytes(f"{sweep}/trials.parquet"))).to_pylist()
    metric = record["config"]["train"]["metric"]
    space = list(record["config"]["tune"]["space"])
    parent = _open(client, experiment, record, storage)
    done = {r.data.tags.get("dcml.trial"): r for r in _children(client, experiment, parent)}
    folders = storage.ls(sweep)
    end = time.time()
    for trial in trials:
        tid = trial["trial"]
        folder = next((f for f in folders if f"_{tid}_" in f), None)
        results = read_trial_results(storage, f"{sweep}/{folder}") if folder else []
        start = results[0]["timestamp"] - results[0].get("time_this_iter_s", 0) if results else end
        if tid not in done:
            tags = {"mlflow.parentRunId": parent, "dcml.trial": tid, "dcml.sweep_id": sweep_id}
            done[tid] = client.create_run(experiment, _ms(start), tags, tid)
        child, there = done[tid].info.run_id, done[tid].data.params
        metrics = [
            _metric(k, v, r.get("time", r["timestamp"]), int(r.get("epoch", i)) + 1)
            for i, r in enumerate(results)
            for k, v in r.items()
            if k not in TUNE_KEYS and _number(v)
        ]
        stamp = results[-1]["timestamp"] if results else end
        if _number(trial.get(metric)):
            metrics.append(_metric(f"best_{metric}", trial[metric], stamp, 0))
        tags = {
            "dcml.status": trial["status"],
            "dcml.stopped_early": str(trial["status"] == "stopped early").lower(),
        }
        if trial.get("error"):
            tags["dcml.error"] = trial["error"]
        params = {k: _value(trial.get(k)) for k in space if k not in there}
        _log(client, child, metrics, params, tags)
        status = RUN_STATUS.get(trial["status"], "FINISHED")
        client.set_terminated(child, status, end_time=_ms(stamp))
    best = trials[0] if trials else {}
    metrics = [_metric(f"best_{metric}", best[metric], end, 0)] if _number(best.get(metric)) else []
    tags = {"dcml.best_trial": best["trial"]} if best else {}
    _log(client, parent, metrics, tags=tags)
    files = {"trials.csv": f"{sweep}/trials.csv", **_plots(storage, sweep)}
    _artifacts(client, parent, storage, files)
    client.set_terminated(parent, "FINISHED", end_time=_ms(end))
    return parent


def _sync_aliases(client, experiment: str, storage: Storage, name: str) -> None:
    held = registry.aliases(storage, name)
    for run in client.search_runs(
        [experiment], f"tags.`dcml.model_name` = '{_quoted(name)}'", max_results=1000
    ):
        ref = run.data.tags.get("dcml.model_version", "")
        version = ref.rpartition("@")[2]
        value = ",".join(sorted(a for a, v in held.items() if str(v) == version))
        if run.data.tags.get("dcml.aliases", "") == value:
            continue
        if value:
            client.set_tag(run.info.run_id, "dcml.aliases", value)
        else:
            client.delete_tag(run.info.run_id, "dcml.aliases")


# ---- MLflow runs, batches and artifacts ----


def _experiment(
    client, cfg: PipelineConfig, default: str | None = None, create: bool = True
) -> str | None:
    name = cfg.tracking.experiment or default or cfg.name
    found = client.get_experiment_by_name(name)
    if found is None and create:
        try:
            return client.create_experiment(name)
        except Exception:  # created by another process meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    return None if found is None else found.experiment_id


def _find(client, experiment: str, run_id: str):
    """The MLflow run of a dcml run or sweep (by its dcml.run_id tag), or None."""
    found = client.search_runs(
        [experiment], f"tags.`dcml.run_id` = '{_quoted(run_id)}'", max_results=1
    )
    return found[0] if found else None


def _children(client, experiment: str, parent: str) -> list:
    where = f"tags.`mlflow.parentRunId` = '{parent}'"
    return list(client.search_runs([experiment], where, max_results=1000))


def _open(client, experiment: str, record: dict[str, Any], storage: Storage) -> str:
    """The MLflow run of a stored dcml run (created on first use), with its config as params and
    its tags; a resumed run keeps the params it was first logged with (MLflow never changes
    a logged param)."""
    run_id = record["run_id"]
    tags = {
        "dcml.run_id": run_id,
        "dcml.kind": record.get("kind", ""),
        "dcml.dataset": record.get("dataset", ""),
        "dcml.storage": storage.uri("runs", run_id),
    }
    found = _find(client, experiment, run_id)
    if found is None:
        start = _ms(record.get("created_at", time.time()))
        found = client.create_run(experiment, start, tags, run_id)
    mlrun = found.info.run_id
    params = {k: v for k, v in _flatten(record["config"]).items() if k != "tracking.mlflow_uri"}
    params = {k: v for k, v in params.items() if k not in found.data.params}
    _log(client, mlrun, params=params, tags=tags)
    return mlrun


def _log(
    client,
    run: str,
    metrics: list | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    from mlflow.entities import Param, RunTag

    batches = {
        "params": ([Param(k, v) for k, v in (params or {}).items()], PARAMS_PER_CALL),
        "tags": ([RunTag(k, str(v)) for k, v in (tags or {}).items()], TAGS_PER_CALL),
        "metrics": (metrics or [], METRICS_PER_CALL),
    }
    for kind, (items, size) in batches.items():
        for i in range(0, len(items), size):
            client.log_batch(run, **{kind: items[i : i + size]})


def _artifacts(client, run: str, storage: Storage, files: dict[str, str]) -> None:
    """Copy stored files (artifact path -> storage path; absent ones skipped) to the run."""
    with tempfile.TemporaryDirectory(prefix="dcml-mlflow-") as tmp:
        copied = 0
        for name, path in files.items():
            if storage.exists(path):
                local = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(path))
                copied += 1
        if copied:
            client.log_artifacts(run, tmp)


def _plots(storage: Storage, run: str) -> dict[str, str]:
    return {f"{PLOTS}/{n}": f"{run}/{PLOTS}/{n}" for n in storage.ls(f"{run}/{PLOTS}")}


def _metric(key: str, value: Any, seconds: float, step: int):
    from mlflow.entities import Metric

    return Metric(_key(key), float(value), _ms(seconds), step)


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat params: {"train": {"lr": 0.01}} -> {"train.lr": "0.01"}."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[_key(f"{prefix}{k}")] = _value(v)
    return out


def _key(key: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", key)[:250]


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:PARAM_CHARS]


def _number(value: Any) -> bool:
    """A finite number (MLflow's UI and comparisons do not take NaN or infinities well)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
