"""Batch inference: raw shards -> the same Predictor as Serve, in Ray Data -> id + predictions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from dcml import registry
from dcml.cluster import connect
from dcml.config import PipelineConfig
from dcml.data.sources import read_dataset, resolve_files
from dcml.predictor import Predictor
from dcml.storage import Commit, Storage, file_entry, require_new_output


class _PredictBatch:
    """Ray Data actor: loads the model once, then predicts and writes batch after batch, each as
    one Parquet file under the output's writer prefix; returns the files' manifest entries."""

    def __init__(self, storage: Storage, model_path: str, id_col: str, out: Storage, base: str):
        self.predictor = Predictor.from_storage(storage, model_path)
        self.id_col, self.out, self.base = id_col, out, base

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import io
        import json
        import uuid

        import pyarrow.parquet as pq

        table = self.predict(batch)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"part-{uuid.uuid4().hex[:16]}.parquet"
        self.out.write_bytes(f"{self.base}/{name}", buf.getvalue())
        entry = {**file_entry(name, buf.getvalue()), "rows": table.num_rows}
        return {"entry": np.array([json.dumps(entry)])}

    def predict(self, batch: pa.Table) -> pa.Table:
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
    registry.require_model(storage, mv)
    out = Storage(output_uri, storage.options)
    require_new_output(out, out.root, f"output {output_uri}")
    fs, files, fmt = resolve_files(input_uri, cfg.data.format, storage.options)
    ds = read_dataset(files, fmt, fs)
    id_col = mv.meta["config"]["data"]["id_column"]
    if id_col is None:
        raise ValueError(
            f"model {mv.ref} was trained on data without an id column (data.id_column)"
        )
    commit = Commit(out, out.root)
    try:
        written = ds.map_batches(
            _PredictBatch,
            fn_constructor_args=(storage, mv.path, id_col, out, commit.base),
            batch_format="pyarrow",
            batch_size=65_536,  # the model is small: big batches keep per-call overhead down
            concurrency=(1, 2),
            # A fraction of a CPU: a whole one, beside a Serve replica, left the read tasks none
            # on a 2-CPU node and the job waited forever.
            num_cpus=0.5,
            num_gpus=1 if cfg.train.use_gpu else 0,
        ).take_all()
        entries = [json.loads(w["entry"]) for w in written]
        rows = sum(e.pop("rows") for e in entries)
        commit.add(entries)
        commit.commit({"kind": "predictions", "model": mv.ref, "input": input_uri, "rows": rows})
    except FileExistsError as e:  # another run wrote this output first
        commit.abort()
        raise FileExistsError(
            f"output {output_uri} exists; predictions never overwrite data"
        ) from e
    except BaseException:
        commit.abort()
        raise
    return rows
