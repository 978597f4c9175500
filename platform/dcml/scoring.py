"""Scoring raw rows: a batch into predictions and rejects (`BatchScorer`), and a unit (an input
file, or some row groups of a Parquet file) into its output files (`score_unit`). Both batch
engines (dcml.batch) run these; so does benchmarks/gpu_check.py on a GPU."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dcml.data.errors import DataError
from dcml.data.sources import read_file
from dcml.data.transforms import Preprocessor, as_text, numeric_matrix
from dcml.predictor import Predictor
from dcml.storage import Storage

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
        self.model_columns = [id_col, *p.inputs]
        self.columns = list(dict.fromkeys([*self.model_columns, *self.passthrough]))

    def missing(self, names: list[str]) -> list[str]:
        return [c for c in self.columns if c not in names]

    def score(self, batch: pa.Table | pa.RecordBatch) -> tuple[pa.Table, pa.Table]:
        return self.score_kept(batch)[:2]

    def score_kept(
        self, batch: pa.Table | pa.RecordBatch
    ) -> tuple[pa.Table, pa.Table, np.ndarray | None]:
        """`score`, and which rows of the batch the predictions are (None: all)."""
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
        return pa.table(table), rejected, keep

    def sampled(
        self, batch, table: pa.Table, keep: np.ndarray | None, fraction: float, rng
    ) -> pa.Table | None:
        """A `fraction` of the scored rows with their inputs, as the prediction log holds them."""
        from dcml.prediction_log import columns_table

        picked = np.flatnonzero(rng.random(table.num_rows) < fraction)
        if not len(picked):
            return None
        rows = pa.array(picked if keep is None else np.flatnonzero(keep)[picked])
        p, inputs = self.predictor, {}
        for c in p.inputs:
            values = batch.column(c).take(rows)
            numeric = c in p.preprocessor.numeric and not _is_number_type(values.type)
            inputs[c] = numbers(values)[0] if numeric else values
        outputs = table.select([*self.outputs, "model_version"]).take(pa.array(picked))
        now = np.full(len(picked), time.time())
        columns = {name: outputs.column(name) for name in outputs.column_names}
        return columns_table(p, now, table.column("id").take(pa.array(picked)), inputs, columns)


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


# --- units ---------------------------------------------------------------------------------------
#
# Both engines score units: a whole input file, or some row groups of a Parquet file. Unit n is
# written as `part-NNNNN.parquet` (units in the input files' order, sorted by name), its rejects
# beside it under `_rejects/`, and reported as manifest entries that carry its counts.

Unit = tuple[str, list[int] | None]


@dataclass(frozen=True)
class Output:
    """Where and how units are read and written: the same for every unit of one output."""

    fs: Any  # the input's fsspec filesystem
    fmt: str
    out: Storage
    base: str  # the output's writer prefix
    batch_size: int
    log: Storage | None = None  # the storage root whose prediction log samples rows
    log_fraction: float = 0.0
    log_folder: str | None = None  # where the samples wait for the output's commit


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
    logged: list[pa.Table] = []
    rng = np.random.default_rng(zlib.crc32(f"{path}:{groups}".encode()))  # the same sample again
    with ExitStack() as files:
        for batch in _batches(scorer, job, path, groups):
            if stop is not None and stop.is_set():
                return []
            if not batch.num_rows:
                continue
            try:
                table, rejected, keep = scorer.score_kept(batch)
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise DataError(f"{path}: cannot be scored: {e}") from e
            if job.log_fraction and table.num_rows:
                logged.append(scorer.sampled(batch, table, keep, job.log_fraction, rng))
            tables = {"rows": table, "rejected": rejected}
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
    if logged := [t for t in logged if t is not None]:
        from dcml.prediction_log import write_log

        try:  # the predictions stand without their sample in the log
            write_log(job.log, scorer.predictor, pa.concat_tables(logged), job.log_folder)
        except Exception as e:
            logging.getLogger(__name__).warning("prediction log: %s not logged: %s", path, e)
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
        asked = [c for c in missing if c in scorer.passthrough and c not in scorer.model_columns]
        why = (
            "listed in predict.passthrough"
            if len(asked) == len(missing)
            else f"the model reads {', '.join(scorer.model_columns)}"
        )
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))} ({why})")


def _parquet(handle, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
