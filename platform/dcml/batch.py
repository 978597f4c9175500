"""Batch inference: raw shards -> the same Predictor as Serve, in Ray Data -> id + predictions."""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from dcml import registry
from dcml.cluster import connect
from dcml.config import PipelineConfig
from dcml.data.sources import read_dataset, resolve_files
from dcml.predictor import Predictor
from dcml.storage import Storage


class _PredictBatch:
    """Ray Data actor: loads the model once, then predicts batch after batch."""

    def __init__(
        self, storage_root: str, storage_options: dict[str, Any], model_path: str, id_col: str
    ):
        self.predictor = Predictor.from_storage(Storage(storage_root, storage_options), model_path)
        self.id_col = id_col

    def __call__(self, batch: pa.Table) -> pa.Table:
        p = self.predictor
        out = p.predict_columns({c: batch.column(c) for c in p.inputs})
        columns = {"id": batch.column(self.id_col)}
        if p.task == "regression":
            columns["value"] = pa.array(out.astype(np.float64))
        else:
            columns["label"] = pa.array(p.labels(out))
            best = out if p.task == "binary" else out.max(axis=1)
            columns["probability"] = pa.array(best.astype(np.float64))
        columns["model_version"] = pa.array([p.version] * len(out))
        return pa.table(columns)


def predict_batch(cfg: PipelineConfig, model_ref: str, input_uri: str, output_uri: str) -> int:
    connect(cfg.cluster)
    storage = Storage.from_config(cfg)
    mv = registry.resolve_model(storage, model_ref)
    out_fs, out_path = fsspec.core.url_to_fs(output_uri, **storage.options)
    if out_fs.exists(out_path):
        raise FileExistsError(f"output {output_uri} exists; predictions never overwrite data")
    fs, files, fmt = resolve_files(input_uri, cfg.data.format, storage.options)
    ds = read_dataset(files, fmt, fs)
    id_col = mv.meta["config"]["data"]["id_column"]
    if id_col is None:
        raise ValueError(
            f"model {mv.ref} was trained on data without an id column (data.id_column)"
        )
    predictions = ds.map_batches(
        _PredictBatch,
        fn_constructor_args=(storage.uri(), storage.options, mv.path, id_col),
        batch_format="pyarrow",
        batch_size=65_536,  # the model is small: big batches keep per-call overhead down
        concurrency=(1, 2),
        # A fraction of a CPU: a whole one, beside a Serve replica, left the read tasks none on a
        # 2-CPU node and the job waited forever.
        num_cpus=0.5,
        num_gpus=1 if cfg.train.use_gpu else 0,
    ).materialize()
    out = Storage(output_uri, cfg.storage.storage_options)
    parent = out.root.rsplit("/", 1)[0]
    tmp = out.tmp_dir(parent)
    try:
        predictions.write_parquet(
            tmp, filesystem=None if out.is_local else pafs.PyFileSystem(pafs.FSSpecHandler(out.fs))
        )
        rows = predictions.count()
        out.commit_dir(tmp, out.root)
    except BaseException:
        out.remove(tmp)
        raise
    return rows
