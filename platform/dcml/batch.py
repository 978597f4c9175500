"""Batch inference: raw files -> the same Predictor as Serve -> the id, the prediction, the model
version and any `predict.passthrough` columns, committed with a manifest like every stored thing.
Rows that cannot be scored go to `_rejects/` with the reason, never into the predictions.

Two engines run the same `BatchScorer` and write the same output files, one per unit (an input
file, or some row groups of a Parquet file), named in the units' order:

* local: threads in this process, one unit each at a time. On one machine a Ray started just for
  this adds only its start-up (5-10 s against 2-3 s of work for 2M rows), so `auto` picks this
  engine wherever dcml would otherwise start a Ray of its own.
* ray: Ray Data over the units on the cluster dcml is connected to; each task reads, scores and
  writes its own unit, so no rows pass through the object store.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from dcml import registry
from dcml.config import PipelineConfig
from dcml.console import Progress
from dcml.data.errors import data_errors_as_raised
from dcml.data.sources import resolve_files
from dcml.prediction_log import publish, staging_folder
from dcml.predictor import Predictor
from dcml.scoring import REJECTS, BatchScorer, Output, Unit, plan_units, score_unit
from dcml.storage import Commit, Storage, require_new_output


def engine_for(cfg: PipelineConfig, *filesystems) -> str:
    """`predict.engine`, with auto resolved: ray where this process has a Ray or a cluster to
    join, local where dcml would start one just for this command or where the input or output
    is in this process's memory (memory://, which Ray workers cannot see)."""
    from dcml.data.sources import in_process

    here = any(in_process(fs) for fs in filesystems)
    if cfg.predict.engine == "ray" and here:
        raise ValueError("predict.engine: ray cannot use memory:// (this process only); use local")
    if cfg.predict.engine != "auto":
        return cfg.predict.engine
    ray = sys.modules.get("ray")
    joined = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    return "ray" if not here and (joined or (ray is not None and ray.is_initialized())) else "local"


def score_locally(
    scorer: BatchScorer, job: Output, units: list[Unit], threads: int, log: Callable[[str], None]
) -> list[dict]:
    """Threads in this process, one unit each at a time. Arrow, NumPy and torch do the work
    with the GIL released, so the threads use the cores; torch gets the cores the threads
    leave."""
    import torch

    stop = threading.Event()
    torch_threads = torch.get_num_threads()
    if scorer.predictor.device.type == "cpu":
        torch.set_num_threads(max(1, torch_threads // threads))
    digits = _digits(units)
    entries: list[dict] = []
    part = "file" if all(groups is None for _, groups in units) else "part"
    pool = ThreadPoolExecutor(threads, thread_name_prefix="dcml-predict")
    try:
        pending = {
            pool.submit(score_unit, scorer, job, u, n, stop, digits) for n, u in enumerate(units)
        }
        with Progress("scoring", parts=len(units), part=part, log=log) as bar:
            while pending:
                done, pending = wait(pending, timeout=1, return_when=FIRST_COMPLETED)
                for future in done:
                    found = future.result()  # a failed unit raises here
                    entries += found
                    bar.update(sum(e.get("rows", 0) + e.get("rejected", 0) for e in found))
    finally:
        stop.set()  # on an error or Ctrl-C: the other threads stop at their next batch
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            torch.set_num_threads(torch_threads)
    return entries


def _digits(units: list[Unit]) -> int:
    """Digits of the output files' numbers: their names sort in the units' order."""
    return max(5, len(str(len(units) - 1)))


class _RayUnits:
    """Ray Data: scores the units of a batch of them (JSON: path, row groups, n) and returns
    their files' manifest entries as JSON. Each call reads its own rows from storage and writes
    its own output: no data passes through the object store. A task keeps the model loaded in
    its worker process for the next file; on GPUs an actor of this class holds it (Ray ends a
    GPU task's worker after each task)."""

    scorers: dict[tuple, BatchScorer] = {}  # per process: one per model

    def __init__(
        self, storage: Storage, model_path: str, options: dict, gpu: bool, job: Output, digits
    ):
        self.job, self.digits = job, digits
        key = (storage.to_uri(model_path), gpu, json.dumps(options, sort_keys=True))
        if key not in self.scorers:
            device = "cuda" if gpu else "cpu"  # a task or actor that asked for a GPU got one
            predictor = Predictor.from_storage(storage, model_path, device)
            self.scorers[key] = BatchScorer(predictor, **options)
        self.scorer = self.scorers[key]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = []
        for unit in batch["unit"]:
            path, groups, n = json.loads(unit)
            entries += score_unit(self.scorer, self.job, (path, groups), n, digits=self.digits)
        return {"entry": np.array([json.dumps(e) for e in entries], dtype=object)}


def _score_units(batch: dict[str, np.ndarray], *args) -> dict[str, np.ndarray]:
    return _RayUnits(*args)(batch)


def score_with_ray(
    cfg: PipelineConfig,
    storage,
    mv,
    options: dict,
    gpu: bool,
    job: Output,
    units: list[Unit],
    log: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    import ray

    args = (storage, mv.path, options, gpu, job, _digits(units))
    items = [{"unit": json.dumps([path, groups, n])} for n, (path, groups) in enumerate(units)]
    with data_errors_as_raised():  # before the dataset is made: it keeps that context
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        if gpu:  # actors: the model and CUDA set up once per GPU
            ds = ds.map_batches(
                _RayUnits,
                fn_constructor_args=args,
                batch_size=1,
                num_gpus=1,
                concurrency=len(units),
            )
        else:
            ds = ds.map_batches(_score_units, fn_args=args, batch_size=1)
        entries = []
        with Progress("scoring", log=log) as bar:  # one row per output file
            for row in ds.iter_rows():
                entries.append(json.loads(row["entry"]))
                bar.update(entries[-1].get("rows", 0) + entries[-1].get("rejected", 0), 0)
    return entries


def predict_batch(
    cfg: PipelineConfig,
    model_ref: str,
    input_uri: str,
    output_uri: str,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Score the raw files at `input_uri` with a registered version into a new output folder:
    its manifest (`rows` scored, `rows_rejected` into `<prefix>/_rejects/`, the `engine`)."""
    t0 = time.monotonic()
    storage = Storage.from_config(cfg)
    mv = registry.resolve_model(storage, model_ref)
    registry.require_model(storage, mv)
    out = Storage(output_uri, storage.options)
    require_new_output(out, out.root, f"output {output_uri}")
    fs, files, fmt = resolve_files(input_uri, cfg.data.format, storage.options)
    id_col = mv.meta["config"]["data"]["id_column"]
    if id_col is None:
        raise ValueError(
            f"model {mv.ref} was trained on data without an id column (data.id_column)"
        )
    options = {
        "id_col": id_col,
        "passthrough": cfg.predict.passthrough,
        "unknown_categories": cfg.serve.unknown_categories,
    }
    engine = engine_for(cfg, fs, out.fs)
    gpu = cfg.train.use_gpu if cfg.predict.use_gpu is None else cfg.predict.use_gpu
    gpu_field = "predict.use_gpu" if cfg.predict.use_gpu is not None else "train.use_gpu"
    where = input_uri if "://" in input_uri else os.path.abspath(input_uri)  # meaningful later
    meta = {"kind": "predictions", "model": mv.ref, "input": where, "engine": engine}
    commit = Commit(out, out.root)
    # sampled rows wait under a staging folder, and join the log once the output is committed
    staged = staging_folder(storage, mv.name, mv.version, commit.prefix)
    fraction = cfg.predict.log_fraction
    job = Output(fs, fmt, out, commit.base, cfg.predict.batch_size, storage, fraction, staged)
    try:
        if engine == "local":
            import torch

            if gpu and not torch.cuda.is_available():
                raise ValueError(f"{gpu_field}: this machine has no CUDA device")
            predictor = Predictor.from_storage(storage, mv.path, "cuda" if gpu else "cpu")
            cores = _cores()
            threads = cfg.predict.threads or cfg.cluster.num_cpus or cores
            units = plan_units(fs, files, fmt, threads)
            meta["threads"] = threads = max(1, min(threads, len(units)))
            entries = score_locally(BatchScorer(predictor, **options), job, units, threads, log)
        else:
            BatchScorer(Predictor.from_storage(storage, mv.path), **options)  # options, early
            units = plan_units(fs, files, fmt, _cluster_slots(cfg, gpu, gpu_field))
            entries = score_with_ray(cfg, storage, mv, options, gpu, job, units, log)
        summary = commit_predictions(commit, entries, meta)
    except FileExistsError as e:  # another run wrote this output first
        _discard(storage, staged, fraction)
        commit.abort()
        raise FileExistsError(
            f"output {output_uri} exists; predictions never overwrite data"
        ) from e
    except BaseException:
        _discard(storage, staged, fraction)
        commit.abort()
        raise
    if fraction:
        try:
            summary["logged_files"] = publish(storage, staged)
        except Exception as e:  # the predictions stand; their sample stays staged
            log(
                f"warning: prediction log: the sample was not published ({e}); it stays in {staged}"
            )
    summary["seconds"] = round(time.monotonic() - t0, 2)
    return summary


def _discard(storage, staged: str, fraction: float) -> None:
    """Remove a failed run's staged log samples (best effort: what a crash leaves under
    `_staged/` is never read as the log)."""
    if fraction:
        try:
            storage.remove(staged)
        except Exception:
            pass


def described(manifest: dict, output: str) -> str:
    """What `dcml predict` wrote, for people."""
    engine = manifest.get("engine", "ray")
    threads = manifest.get("threads", 1)
    how = f"{_count(threads, 'local thread')}" if engine == "local" else "Ray Data"
    rows, seconds = manifest["rows"], manifest.get("seconds")
    text = f"wrote {_count(rows, 'prediction')} to {output} with {how}"
    if seconds:
        rate = (rows + manifest["rows_rejected"]) / seconds
        text += f" (scored in {seconds:.1f} s, {rate:,.0f} rows/s)"
    if manifest["rows_rejected"]:
        folder = "/".join(filter(None, [output.rstrip("/"), manifest.get("prefix"), REJECTS]))
        text += f"\n{_count(manifest['rows_rejected'], 'row')} could not be scored: {folder}/ "
        text += "has their id, field and reason"
    return text


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'' if n == 1 else 's'}"


def _cores() -> int:
    """The cores this process may use (a container's share; all of them where the OS cannot
    tell, as on macOS)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _cluster_slots(cfg: PipelineConfig, gpu: bool, gpu_field: str) -> int:
    """How many units the cluster can score at once: its CPUs, or with a GPU each, its GPUs."""
    from dcml.cluster import connect

    connect(cfg.cluster)
    import ray

    resources = ray.cluster_resources()
    if gpu and not resources.get("GPU"):
        raise ValueError(f"{gpu_field}: the Ray cluster has no GPU")
    return max(1, int(resources.get("GPU" if gpu else "CPU", 1)))


def commit_predictions(commit: Commit, entries: list[dict], meta: dict) -> dict:
    """Commit the files the engines wrote (their manifest entries, with the counts of rows
    scored and rejected), with `meta` and the counts: the manifest."""
    files = [dict(e) for e in entries]
    rows = sum(f.pop("rows", 0) for f in files)
    rejected = sum(f.pop("rejected", 0) for f in files)
    commit.add(files)
    return commit.commit({**meta, "rows": rows, "rows_rejected": rejected})
