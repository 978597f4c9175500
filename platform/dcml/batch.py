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

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dcml import registry
from dcml.config import PipelineConfig
from dcml.data.errors import DataError
from dcml.data.sources import read_file, resolve_files
from dcml.data.transforms import Preprocessor, as_text, numeric_matrix
from dcml.predictor import Predictor
from dcml.storage import Commit, Storage, require_new_output

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
        not_numbers: dict[int, dict[str, Any]] = {}
        for name in p.preprocessor.numeric:  # text in a numeric column: a reject, as Serve's 422
            if not _is_number_type(columns[name].type):
                columns[name], bad = numbers(columns[name])
                for row in np.flatnonzero(bad).tolist():
                    not_numbers.setdefault(row, {"field": name, "msg": "not a number"})
        raw = numeric_matrix(columns, p.preprocessor.numeric) if p.preprocessor.numeric else None
        out, problems = p.score(p.preprocessor.transform(columns, numeric=raw), raw)
        problems = problems | not_numbers  # the cause, not its NaN
        if self.reject_unseen:
            problems = unseen_categories(p.preprocessor, columns) | problems
        ids = batch.column(self.id_col)
        missing = pc.is_null(ids)
        if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
            missing = pc.or_(missing, pc.equal(pc.utf8_trim_whitespace(ids), ""))
        for row in np.flatnonzero(missing.to_numpy(zero_copy_only=False)).tolist():
            problems[row] = {"field": self.id_col, "msg": "no id: cannot be joined"}
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


def _is_number_type(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or (pa.types.is_decimal(t) or pa.types.is_null(t))
    )


def numbers(values: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """A text column that should hold numbers -> (float64, the rows that hold something else).
    Blank and NA-like text is missing (NaN), as in preprocessing."""
    import pandas as pd

    from dcml.data.clean import NULL_TEXT

    text = pd.Series(pc.cast(values, pa.string()).to_pylist(), dtype=object)
    parsed = pd.to_numeric(text, errors="coerce")
    blank = text.isna() | text.astype(str).str.strip().str.lower().isin(NULL_TEXT)
    bad = (parsed.isna() & ~blank).to_numpy()
    return pa.array(parsed.to_numpy(dtype=np.float64, na_value=np.nan)), bad


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


class _Sink:
    """An output file written as it is made (no copy of it in memory), hashed and counted on the
    way for the manifest. It lies under the writer's own prefix: a torn one is never listed."""

    def __init__(self, storage: Storage, path: str):
        if storage.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = storage.fs.open(path, "wb")
        self.sha256, self.bytes, self.closed = hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:  # ParquetWriter's; the file itself closes on leaving `with`
        self.closed = True

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def score_unit(
    scorer: BatchScorer,
    job: Output,
    unit: Unit,
    n: int,
    stop: threading.Event | None = None,
    digits: int = 5,
) -> list[dict]:
    """Score one unit batch by batch into its output files; their manifest entries."""
    path, groups = unit
    name = f"part-{n:0{digits}d}.parquet"
    names = {"rows": name, "rejected": f"{REJECTS}/{name}"}
    sinks: dict[str, _Sink] = {}
    writers: dict[str, pq.ParquetWriter] = {}
    counts = {"rows": 0, "rejected": 0}
    with ExitStack() as files:
        for batch in _batches(scorer, job, path, groups):
            if stop is not None and stop.is_set():
                return []
            if not batch.num_rows:
                continue
            try:
                tables = dict(zip(names, scorer.score(batch), strict=True))
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise DataError(f"{path}: cannot be scored: {e}") from e
            for kind, table in tables.items():
                if table.num_rows:
                    if kind not in writers:
                        sink = _Sink(job.out, f"{job.base}/{names[kind]}")
                        sinks[kind] = files.enter_context(sink)
                        writers[kind] = parquet_writer(sinks[kind], table.schema)
                    writers[kind].write_table(table)
                    counts[kind] += table.num_rows
        for writer in writers.values():
            writer.close()
    return [
        {"path": names[k], "bytes": s.bytes, "sha256": s.sha256.hexdigest(), k: counts[k]}
        for k, s in sinks.items()
    ]


def _batches(scorer: BatchScorer, job: Output, path: str, groups: list[int] | None):
    if job.fmt != "parquet":
        if job.fs.size(path) == 0:  # an empty part file (Spark writes them): no rows
            return
        table = read_file(job.fs, path, job.fmt, text_columns=[scorer.id_col])
        _check_columns(scorer, table.column_names, path)
        yield from table.to_batches(job.batch_size)
        return
    # no read-ahead on object stores: Parquet reads the column chunks it needs, by range
    options = {} if isinstance(job.fs, LocalFileSystem) else {"cache_type": "none"}
    with job.fs.open(path, "rb", **options) as handle:
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
    digits = _digits(units)
    entries: list[dict] = []
    started = last = time.monotonic()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="dcml-predict")
    try:
        pending = {
            pool.submit(score_unit, scorer, job, u, n, stop, digits) for n, u in enumerate(units)
        }
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
    cfg: PipelineConfig, storage, mv, options: dict, gpu: bool, job: Output, units: list[Unit]
) -> list[dict]:
    import ray

    from dcml.data.errors import find_data_error

    args = (storage, mv.path, options, gpu, job, _digits(units))
    items = [{"unit": json.dumps([path, groups, n])} for n, (path, groups) in enumerate(units)]
    ctx = ray.data.DataContext.get_current()
    # A DataError raised in a task reaches us as itself, not as a generic UserCodeException (a
    # dataset keeps the context it was made in: set before making it).
    saved, ctx.raise_original_map_exception = ctx.raise_original_map_exception, True
    try:
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
        written = ds.take_all()
    except Exception as e:
        found = find_data_error(e)
        if found is None or found is e:
            raise
        raise found from None  # the message alone, without Ray's task wrappers
    finally:
        ctx.raise_original_map_exception = saved
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
    engine = engine_for(cfg, fs, out.fs)
    gpu = cfg.train.use_gpu if cfg.predict.use_gpu is None else cfg.predict.use_gpu
    gpu_field = "predict.use_gpu" if cfg.predict.use_gpu is not None else "train.use_gpu"
    meta = {"kind": "predictions", "model": mv.ref, "input": input_uri, "engine": engine}
    commit = Commit(out, out.root)
    job = Output(fs, fmt, out, commit.base, cfg.predict.batch_size)
    try:
        if engine == "local":
            import torch

            if gpu and not torch.cuda.is_available():
                raise ValueError(f"{gpu_field}: this machine has no CUDA device")
            predictor = Predictor.from_storage(storage, mv.path, "cuda" if gpu else "cpu")
            cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers)
            threads = cfg.predict.threads or cfg.cluster.num_cpus or cores
            units = plan_units(fs, files, fmt, threads)
            meta["threads"] = threads = max(1, min(threads, len(units)))
            entries = score_locally(BatchScorer(predictor, **options), job, units, threads, log)
        else:
            BatchScorer(Predictor.from_storage(storage, mv.path), **options)  # options, early
            units = plan_units(fs, files, fmt, _cluster_slots(cfg, gpu, gpu_field))
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
