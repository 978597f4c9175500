"""Batch inference: raw files -> the same Predictor as Serve -> the id, the prediction, the model
version and any `predict.passthrough` columns, committed with a manifest like every stored thing.
Rows that cannot be scored go to `_rejects/` with the reason, never into the predictions.

Two engines run the same `BatchScorer` and the same commit:

* local: threads in this process, each scoring one input file (or a part of a Parquet file's row
  groups) at a time and writing one output file for it. On one machine a Ray started just for this
  adds only its start-up (5-10 s against 2-3 s of work for 2M rows), so `auto` picks this engine
  wherever dcml would otherwise start a Ray of its own.
* ray: Ray Data actors on the cluster dcml is connected to, one output file per batch.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcml import registry
from dcml.config import PipelineConfig
from dcml.data.errors import DataError
from dcml.data.sources import read_file, resolve_files
from dcml.data.transforms import Preprocessor, as_text, numeric_matrix
from dcml.predictor import Predictor
from dcml.storage import Commit, Storage, file_entry, require_new_output

# Rows that cannot be scored, with the reason, beside the predictions. pyarrow and most readers
# skip names starting with "_", so reading the output folder reads the predictions alone.
REJECTS = "_rejects"


class BatchScorer:
    """A batch of raw rows -> (the predictions table, the rejects table: id, field, reason)."""

    def __init__(
        self,
        predictor: Predictor,
        id_col: str,
        passthrough: list[str] = (),
        unknown_categories: str = "bucket",
    ):
        self.predictor, self.id_col = predictor, id_col
        self.passthrough = list(passthrough)
        self.reject_unseen = unknown_categories == "reject"
        p = predictor
        if p.task == "regression":
            self.outputs = ["value"]
        else:
            self.outputs = ["label", "probability"]
            if p.task == "multiclass":
                self.outputs += [f"probability_{c}" for c in p.classes]
            self.class_labels = pa.array(p.classes)
        clash = sorted({"id", "model_version", *self.outputs} & set(self.passthrough))
        if clash:
            raise ValueError(
                f"predict.passthrough: {', '.join(clash)} would replace an output column "
                f"of the same name (the output has id, {', '.join(self.outputs)}, model_version)"
            )
        self.columns = list(dict.fromkeys([id_col, *p.inputs, *self.passthrough]))

    def missing(self, names: list[str]) -> list[str]:
        return [c for c in self.columns if c not in names]

    def score(self, batch: pa.Table | pa.RecordBatch) -> tuple[pa.Table, pa.Table]:
        p = self.predictor
        columns = {c: batch.column(c) for c in p.inputs}
        raw = numeric_matrix(columns, p.preprocessor.numeric) if p.preprocessor.numeric else None
        out, problems = p.score(p.preprocessor.transform(columns, numeric=raw), raw)
        if self.reject_unseen:
            problems = unseen_categories(p.preprocessor, columns) | problems
        ids = batch.column(self.id_col)
        if ids.null_count:
            for row in np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False)).tolist():
                problems.setdefault(row, {"field": self.id_col, "msg": "no id: cannot be joined"})
        keep = None
        if problems:
            keep = np.ones(len(out), dtype=bool)
            keep[list(problems)] = False
            out = out[keep]
        rows = sorted(problems)
        rejected = pa.table(
            {
                "id": ids.take(pa.array(rows, pa.int64())),
                "field": pa.array([problems[i]["field"] for i in rows], pa.string()),
                "reason": pa.array([problems[i]["msg"] for i in rows], pa.string()),
            }
        )

        def kept(values):
            return values if keep is None else values.filter(pa.array(keep))

        table = {"id": kept(ids)}
        if p.task == "regression":
            table["value"] = pa.array(out.astype(np.float64))
        else:
            table["label"] = self.class_labels.take(pa.array(p.class_indices(out)))
            best = out if p.task == "binary" else out.max(axis=1)
            table["probability"] = pa.array(best.astype(np.float64))
            if p.task == "multiclass":
                for j, name in enumerate(self.outputs[2:]):
                    table[name] = pa.array(out[:, j].astype(np.float64))
        table["model_version"] = pa.repeat(pa.scalar(p.version), len(out))
        for name in self.passthrough:
            table[name] = kept(batch.column(name))
        return pa.table(table), rejected


def unseen_categories(pre: Preprocessor, columns: dict) -> dict[int, dict[str, Any]]:
    """Rows with a category training never saw (`serve.unknown_categories: reject`: what Serve
    answers with a 422), by their first such column."""
    problems: dict[int, dict[str, Any]] = {}
    for name in pre.categorical:
        known = pre.categories[name]
        if not known:  # no category kept in training: every value is the unknown bucket's
            continue
        values = as_text(columns[name])
        unseen = pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(known))))
        listed = ", ".join(map(repr, known[:10])) + (", ..." if len(known) > 10 else "")
        problem = {"field": name, "msg": f"not a category seen in training: {listed}"}
        for row in np.flatnonzero(unseen.to_numpy(zero_copy_only=False)).tolist():
            problems.setdefault(row, problem)
    return problems


def parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    """Dictionary-encoded columns only where values repeat (a label, the model version, text):
    trying it on ids and probabilities first doubled the time of a write."""
    repeated = [f.name for f in schema if not pa.types.is_floating(f.type) and f.name != "id"]
    return pq.ParquetWriter(sink, schema, use_dictionary=repeated)


# --- the engines ---------------------------------------------------------------------------------
#
# Both score units: a whole input file, or some row groups of a Parquet file. Unit n is written as
# `part-NNNNN.parquet` (units in the input files' order, sorted by name), its rejects beside it
# under `_rejects/`, and reported as manifest entries that carry its counts.

Unit = tuple[str, list[int] | None]


@dataclass(frozen=True)
class Output:
    """Where and how units are read and written: the same for every unit of one output."""

    fs: Any  # the input's fsspec filesystem
    fmt: str
    out: Storage
    base: str  # the output's writer prefix
    batch_size: int


def engine_for(cfg: PipelineConfig) -> str:
    """`predict.engine`, with auto resolved: ray where this process has a Ray or a cluster to
    join, local where dcml would start one just for this command."""
    if cfg.predict.engine != "auto":
        return cfg.predict.engine
    ray = sys.modules.get("ray")
    joined = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    return "ray" if joined or (ray is not None and ray.is_initialized()) else "local"


def plan_units(fs, files: list[str], fmt: str, parallel: int) -> list[Unit]:
    """Whole files; with fewer Parquet files than `parallel`, each split by its row groups."""
    if fmt != "parquet" or len(files) >= parallel:
        return [(f, None) for f in files]
    units: list[Unit] = []
    for f in files:
        with fs.open(f, "rb") as handle:
            groups = _parquet(handle, f).num_row_groups
        parts = np.array_split(np.arange(groups), max(1, min(groups, -(-parallel // len(files)))))
        units += [(f, part.tolist()) for part in parts if len(part)] or [(f, None)]
    return units


def score_unit(
    scorer: BatchScorer, job: Output, unit: Unit, n: int, stop: threading.Event | None = None
) -> list[dict]:
    """Score one unit batch by batch into its output files; their manifest entries."""
    path, groups = unit
    name = f"part-{n:05d}.parquet"
    names = {"rows": name, "rejected": f"{REJECTS}/{name}"}
    writers: dict[str, pq.ParquetWriter] = {}
    buffers: dict[str, io.BytesIO] = {}
    counts = {"rows": 0, "rejected": 0}
    for batch in _batches(scorer, job, path, groups):
        if stop is not None and stop.is_set():
            return []
        try:
            tables = dict(zip(names, scorer.score(batch), strict=True))
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise DataError(f"{path}: cannot be scored: {e}") from e
        for kind, table in tables.items():
            if table.num_rows:
                if kind not in writers:
                    buffers[kind] = io.BytesIO()
                    writers[kind] = parquet_writer(buffers[kind], table.schema)
                writers[kind].write_table(table)
                counts[kind] += table.num_rows
    entries = []
    for kind, writer in writers.items():
        writer.close()
        data = buffers[kind].getvalue()
        job.out.write_bytes(f"{job.base}/{names[kind]}", data)
        entries.append({**file_entry(names[kind], data), kind: counts[kind]})
    return entries


def _batches(scorer: BatchScorer, job: Output, path: str, groups: list[int] | None):
    if job.fmt != "parquet":
        table = read_file(job.fs, path, job.fmt)
        _check_columns(scorer, table.column_names, path)
        yield from table.to_batches(job.batch_size)
        return
    with job.fs.open(path, "rb") as handle:
        pf = _parquet(handle, path)
        _check_columns(scorer, pf.schema_arrow.names, path)
        try:
            yield from pf.iter_batches(job.batch_size, groups, columns=scorer.columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from e


def _check_columns(scorer: BatchScorer, names: list[str], path: str) -> None:
    if missing := scorer.missing(names):
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))} (the model reads "
            f"{', '.join(scorer.columns)})"
        )


def _parquet(handle, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from e


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
    entries: list[dict] = []
    started = last = time.monotonic()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="dcml-predict")
    try:
        pending = {pool.submit(score_unit, scorer, job, u, n, stop) for n, u in enumerate(units)}
        while pending:
            done, pending = wait(pending, timeout=10, return_when=FIRST_EXCEPTION)
            for future in done:
                entries += future.result()  # a failed unit raises here
            if pending and time.monotonic() - last >= 10:
                last = time.monotonic()
                rows = sum(e.get("rows", 0) + e.get("rejected", 0) for e in entries)
                rate = rows / (last - started)
                log(f"scored {rows:,} rows ({rate:,.0f} rows/s); {len(pending)} file(s) to go")
    finally:
        stop.set()  # on an error or Ctrl-C: the other threads stop at their next batch
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
    return entries


# One scorer per model per process: a Ray worker process keeps it across the tasks it runs.
_scorers: dict[tuple, BatchScorer] = {}


def _score_units(
    batch: dict[str, np.ndarray],
    storage: Storage,
    model_path: str,
    options: dict,
    gpu: bool,
    job: Output,
) -> dict[str, np.ndarray]:
    """Ray Data: score the units of a batch of them (JSON: path, row groups, n); their files'
    manifest entries, as JSON. Each task reads its own rows from storage and writes its own
    output: no data passes through the object store."""
    key = (storage.to_uri(model_path), gpu, json.dumps(options, sort_keys=True))
    if key not in _scorers:
        device = "cuda" if gpu else "cpu"  # a task that asked for a GPU got one
        _scorers[key] = BatchScorer(Predictor.from_storage(storage, model_path, device), **options)
    entries = []
    for unit in batch["unit"]:
        path, groups, n = json.loads(unit)
        entries += score_unit(_scorers[key], job, (path, groups), n)
    return {"entry": np.array([json.dumps(e) for e in entries], dtype=object)}


def score_with_ray(
    cfg: PipelineConfig, storage, mv, options: dict, gpu: bool, job: Output, units: list[Unit]
) -> list[dict]:
    import ray

    from dcml.cluster import connect
    from dcml.data.sources import in_process

    if in_process(job.fs):
        raise ValueError("predict.engine: ray cannot read memory:// (this process only); use local")
    connect(cfg.cluster)
    items = [{"unit": json.dumps([path, groups, n])} for n, (path, groups) in enumerate(units)]
    written = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            _score_units,
            fn_args=(storage, mv.path, options, gpu, job),
            batch_size=1,
            num_gpus=1 if gpu else 0,
        )
        .take_all()
    )
    return [json.loads(w["entry"]) for w in written]


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
    engine = engine_for(cfg)
    gpu = cfg.train.use_gpu if cfg.predict.use_gpu is None else cfg.predict.use_gpu
    meta = {"kind": "predictions", "model": mv.ref, "input": input_uri, "engine": engine}
    commit = Commit(out, out.root)
    job = Output(fs, fmt, out, commit.base, cfg.predict.batch_size)
    try:
        if engine == "local":
            import torch

            if gpu and not torch.cuda.is_available():
                raise ValueError("predict.use_gpu: this machine has no CUDA device")
            predictor = Predictor.from_storage(storage, mv.path, "cuda" if gpu else "cpu")
            threads = cfg.predict.threads or cfg.cluster.num_cpus or os.cpu_count() or 1
            units = plan_units(fs, files, fmt, threads)
            meta["threads"] = threads = max(1, min(threads, len(units)))
            entries = score_locally(BatchScorer(predictor, **options), job, units, threads, log)
        else:
            BatchScorer(Predictor.from_storage(storage, mv.path), **options)  # options, early
            units = plan_units(fs, files, fmt, _cluster_slots(cfg, gpu))
            entries = score_with_ray(cfg, storage, mv, options, gpu, job, units)
        summary = commit_predictions(commit, entries, meta)
    except FileExistsError as e:  # another run wrote this output first
        commit.abort()
        raise FileExistsError(
            f"output {output_uri} exists; predictions never overwrite data"
        ) from e
    except BaseException:
        commit.abort()
        raise
    summary["seconds"] = round(time.monotonic() - t0, 2)
    return summary


def described(manifest: dict, output: str) -> str:
    """What `dcml predict` wrote, for people."""
    engine = manifest.get("engine", "ray")
    how = f"{manifest['threads']} local threads" if engine == "local" else "Ray Data"
    rows, seconds = manifest["rows"], manifest.get("seconds")
    text = f"wrote {rows:,} predictions to {output} with {how}"
    if seconds:
        text += f" in {seconds:.1f} s ({(rows + manifest['rows_rejected']) / seconds:,.0f} rows/s)"
    if manifest["rows_rejected"]:
        folder = "/".join(filter(None, [output.rstrip("/"), manifest.get("prefix"), REJECTS]))
        text += f"\n{manifest['rows_rejected']:,} rows could not be scored: {folder}/ has their "
        text += "id, field and reason"
    return text


def _cluster_slots(cfg: PipelineConfig, gpu: bool) -> int:
    """How many units the cluster can score at once: its CPUs, or with a GPU each, its GPUs."""
    from dcml.cluster import connect

    connect(cfg.cluster)
    import ray

    resources = ray.cluster_resources()
    if gpu and not resources.get("GPU"):
        raise ValueError("predict.use_gpu: the Ray cluster has no GPU")
    return max(1, int(resources.get("GPU" if gpu else "CPU", 1)))


def commit_predictions(commit: Commit, entries: list[dict], meta: dict) -> dict:
    """Commit the files the engines wrote (their manifest entries, with the counts of rows
    scored and rejected), with `meta` and the counts: the manifest."""
    files = [dict(e) for e in entries]
    rows = sum(f.pop("rows", 0) for f in files)
    rejected = sum(f.pop("rejected", 0) for f in files)
    commit.add(files)
    return commit.commit({**meta, "rows": rows, "rows_rejected": rejected})
