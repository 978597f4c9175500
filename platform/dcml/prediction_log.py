"""The prediction log: a sample of scored records with their predictions, stored as Parquet
under `predictions/<model>/<version>/date=YYYY-MM-DD/`, which `dcml monitor` compares with the
training data.

A Serve replica (or `dcml predict`) hands each scored batch to `PredictionLog.add`, which samples
`fraction` of its records into a bounded buffer and returns at once: a full buffer drops samples
(counted, never waited for). A thread writes the buffer when it holds `flush_rows` records or
every `flush_s` seconds, one file per version and day, each created whole under a name of its
own (an exclusive create: a reader sees a whole file or none, on object stores too).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dcml.data.columns import class_key
from dcml.layout import prediction_log_folder
from dcml.storage import Storage

log = logging.getLogger(__name__)

TIME = "time"


# the log's own columns; an input of one of these names is stored as `input.<name>`
OWN = {TIME, "id", "label", "probability", "value", "model_version"}


def input_column(name: str) -> str:
    """The log's column for an input feature."""
    return f"input.{name}" if name in OWN or name.startswith("probability_") else name


class PredictionLog:
    def __init__(
        self,
        storage: Storage,
        fraction: float,
        flush_rows: int = 1000,
        flush_s: float = 60.0,
        max_rows: int = 100_000,
        on_drop: Callable[[Any, int], None] | None = None,
    ):
        self.storage, self.fraction = storage, fraction
        self.flush_rows, self.flush_s, self.max_rows = flush_rows, flush_s, max_rows
        self.on_drop = on_drop
        self.rng = np.random.default_rng()
        self.lock = threading.Lock()
        # (predictor, time, records, answers) not written yet, and their record count
        self.pending: list[tuple[Any, float, list, list]] = []
        self.rows = 0
        self.dropped = 0
        self.written: deque[str] = deque(maxlen=100)  # the latest files written
        self.failing = False  # storage failed at the last write (warned once until it works)
        self.wake = threading.Event()
        self.closed = False
        self.writer = threading.Thread(target=self._run, name="dcml-prediction-log", daemon=True)
        if fraction > 0:
            self.writer.start()

    def add(
        self,
        predictor: Any,
        records: Sequence[Mapping[str, Any]],
        answers: Sequence[Mapping[str, Any]],
    ) -> None:
        """Sample the records of one answer (never blocks on storage)."""
        if self.fraction <= 0:
            return
        n = len(records)
        sampled = (
            range(n) if self.fraction >= 1 else np.flatnonzero(self.rng.random(n) < self.fraction)
        )
        picked = [int(i) for i in sampled if "error" not in answers[i]]
        if not picked:
            return
        now = time.time()
        with self.lock:
            room = 0 if self.closed else max(self.max_rows - self.rows, 0)
            dropped = max(0, len(picked) - room)
            picked = picked[:room]
            if picked:
                rows = [records[i] for i in picked], [answers[i] for i in picked]
                self.pending.append((predictor, now, *rows))
                self.rows += len(picked)
            self.dropped += dropped
            full = self.rows >= self.flush_rows
        if dropped and self.on_drop:
            self.on_drop(predictor, dropped)
        if full:
            self.wake.set()

    def _run(self) -> None:
        while not self.closed:
            self.wake.wait(self.flush_s)
            self.wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write what is pending now: one file per model version and day."""
        with self.lock:
            taken, self.pending, self.rows = self.pending, [], 0
        groups: dict[tuple[str, str], list] = {}
        for item in taken:
            day = dt.datetime.fromtimestamp(item[1], dt.timezone.utc).date().isoformat()
            groups.setdefault((item[0].version, day), []).append(item)
        for (_, day), items in groups.items():
            predictor = items[0][0]
            try:
                path = write_log(self.storage, predictor, log_table(predictor, items), day=day)
                self.written.append(path)
                self.failing = False
            except Exception as e:  # storage unreachable: these samples are lost, serving goes on
                lost = sum(len(i[2]) for i in items)
                if not self.failing:
                    log.warning("prediction log: could not write %d record(s): %s", lost, e)
                self.failing = True
                with self.lock:
                    self.dropped += lost
                if self.on_drop:
                    self.on_drop(predictor, lost)

    def close(self) -> None:
        """Write what is pending and stop the writer (a replica shutting down); later samples
        are dropped and counted."""
        if self.fraction <= 0 or self.closed:
            return
        with self.lock:
            self.closed = True
        self.wake.set()
        self.writer.join(timeout=30)
        self.flush()


def log_table(predictor: Any, items: list) -> pa.Table:
    """(predictor, time, records, answers) items -> the log's table."""
    records = [r for item in items for r in item[2]]
    answers = [a for item in items for a in item[3]]
    pre = predictor.preprocessor
    inputs = {c: pa.array([r.get(c) for r in records], pa.float64()) for c in pre.numeric}
    for c in pre.categorical:
        inputs[c] = pa.array([_text(r.get(c)) for r in records], pa.string())
    if predictor.task == "regression":
        outputs = {"value": [a["value"] for a in answers]}
    else:
        outputs = {"label": [class_key(a["label"]) for a in answers]}
        outputs["probability"] = [a["probability"] for a in answers]
        for c in predictor.classes if predictor.task == "multiclass" else []:
            outputs[f"probability_{c}"] = [a["probabilities"][str(c)] for a in answers]
    return columns_table(
        predictor,
        [item[1] for item in items for _ in item[2]],
        pa.array([_text(r.get("id")) for r in records], pa.string()),
        inputs,
        {**outputs, "model_version": [a["model_version"] for a in answers]},
    )


def columns_table(
    predictor: Any, times: Any, ids: Any, inputs: dict[str, Any], outputs: dict[str, Any]
) -> pa.Table:
    """The log's columns, one schema for Serve and `dcml predict`: time, id (text), the inputs
    (numbers as float64, categories as text, see `input_column`), the prediction (label as
    `class_key` text + probability [+ probability_<class>], or value) and model_version."""
    pre = predictor.preprocessor
    stamps = (np.asarray(times, dtype=np.float64) * 1000).astype(np.int64)
    columns = {
        TIME: pa.array(stamps).cast(pa.timestamp("ms", tz="UTC")),
        "id": pc.cast(ids, pa.string()),
    }
    for c in pre.numeric:
        columns[input_column(c)] = pc.cast(inputs[c], pa.float64())
    for c in pre.categorical:
        columns[input_column(c)] = pc.cast(inputs[c], pa.string())
    for name, values in outputs.items():
        kind = pa.string() if name in ("label", "model_version") else pa.float64()
        array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
        columns[name] = pc.cast(array, kind)
    return pa.table(columns)


def write_log(
    storage: Storage, predictor: Any, table: pa.Table, folder: str | None = None, day: str = ""
) -> str:
    """Create one log file (a new name, written whole) under the version's log, or under
    `folder` (a staging folder, see `publish`); its path."""
    m = predictor.meta
    first = pc.min(table.column(TIME)).value / 1000
    day = day or dt.datetime.fromtimestamp(first, dt.timezone.utc).date().isoformat()
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    if folder is None:
        folder = prediction_log_folder(storage, m.get("name"), m.get("version"))
    stamp = time.strftime("%H%M%S", time.gmtime(first))
    path = f"{folder}/date={day}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
    storage.create(path, buf.getvalue())
    return path


def staging_folder(storage: Storage, name: str, version: int | str, tx: str) -> str:
    """Where `dcml predict` writes its log files until its output is committed: read_log reads
    only `date=` folders, so nothing here counts until `publish` moves it."""
    return f"{prediction_log_folder(storage, name, version)}/_staged/{tx}"


def publish(storage: Storage, staged: str) -> int:
    """Move a committed output's staged log files into the log (each move creates one whole
    object: a rename here, a server-side copy on S3); the files moved."""
    final = staged.rsplit("/_staged/", 1)[0]
    moved = 0
    for day in storage.ls(staged):
        for name in storage.ls(f"{staged}/{day}"):
            if name.endswith(".parquet"):
                if storage.is_local:
                    os.makedirs(f"{final}/{day}", exist_ok=True)
                storage.fs.mv(f"{staged}/{day}/{name}", f"{final}/{day}/{name}")
                moved += 1
    storage.remove(staged)
    return moved


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def read_log(
    storage: Storage, name: str, version: int | str, since: float | None = None
) -> pa.Table | None:
    """The logged records of one model version (from `since`, a Unix time), or None if none."""
    folder = prediction_log_folder(storage, name, version)
    first_day = (
        dt.datetime.fromtimestamp(since, dt.timezone.utc).date().isoformat() if since else ""
    )
    paths = []
    for entry in storage.ls(folder):
        day = entry.removeprefix("date=")
        if not entry.startswith("date=") or day < first_day:
            continue
        # only whole files: not a local write's temporary file beside them
        paths += [
            f"{folder}/{entry}/{n}"
            for n in storage.ls(f"{folder}/{entry}")
            if n.endswith(".parquet")
        ]
    if not paths:
        return None
    # read in parallel (pyarrow's threads): a busy replica writes a file a minute; every file of
    # one version has one schema (columns_table casts each column)
    table = pads.dataset(paths, format="parquet", filesystem=storage.arrow_fs()).to_table()
    if since:
        stamp = pa.scalar(int(since * 1000), pa.timestamp("ms", tz="UTC"))
        table = table.filter(pc.greater_equal(table.column(TIME), stamp))
    return table
