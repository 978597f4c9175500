"""Batch inference: raw shards -> the same Predictor as Serve, in Ray Data -> id + predictions."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dcml import registry
from dcml.cluster import connect
from dcml.config import PipelineConfig
from dcml.data.sources import read_dataset, resolve_files
from dcml.data.transforms import Preprocessor, as_text, numeric_matrix
from dcml.predictor import Predictor
from dcml.storage import Commit, Storage, file_entry, require_new_output

# Rows that cannot be scored, with the reason, beside the predictions. pyarrow and most readers
# skip names starting with "_", so reading the output folder reads the predictions alone.
REJECTS = "_rejects"


class _PredictBatch:
    """Ray Data actor: loads the model once, then predicts and writes batch after batch, each as
    one Parquet file under the output's writer prefix; returns the files' manifest entries."""

    def __init__(
        self,
        storage: Storage,
        model_path: str,
        id_col: str,
        out: Storage,
        base: str,
        unknown_categories: str = "bucket",
    ):
        self.predictor = Predictor.from_storage(storage, model_path)
        self.id_col, self.out, self.base = id_col, out, base
        self.reject_unseen = unknown_categories == "reject"

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import uuid

        scored, rejected = self.predict(batch)
        name = f"part-{uuid.uuid4().hex[:16]}.parquet"
        entries = [self._write(name, scored, "rows")] if scored.num_rows else []
        if rejected.num_rows:
            entries.append(self._write(f"{REJECTS}/{name}", rejected, "rejected"))
        return {"entry": np.array([json.dumps(e) for e in entries])}

    def _write(self, name: str, table: pa.Table, count: str) -> dict:
        import io

        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.out.write_bytes(f"{self.base}/{name}", buf.getvalue())
        return {**file_entry(name, buf.getvalue()), count: table.num_rows}

    def predict(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(the scored rows' predictions, the rows that cannot be scored: id, field, reason)."""
        p = self.predictor
        columns = {c: batch.column(c) for c in p.inputs}
        raw = numeric_matrix(columns, p.preprocessor.numeric) if p.preprocessor.numeric else None
        out, problems = p.score(p.preprocessor.transform(columns, numeric=raw), raw)
        if self.reject_unseen:
            problems = unseen_categories(p.preprocessor, columns) | problems
        ids = batch.column(self.id_col)
        bad = np.zeros(len(out), dtype=bool)
        bad[list(problems)] = True
        rejected = pa.table(
            {
                "id": ids.filter(pa.array(bad)),
                "field": pa.array([problems[i]["field"] for i in sorted(problems)], pa.string()),
                "reason": pa.array([problems[i]["msg"] for i in sorted(problems)], pa.string()),
            }
        )
        if bad.any():
            out, ids = out[~bad], ids.filter(pa.array(~bad))
        columns = {"id": ids}
        if p.task == "regression":
            columns["value"] = pa.array(out.astype(np.float64))
        else:
            columns["label"] = pa.array(p.labels(out))
            best = out if p.task == "binary" else out.max(axis=1)
            columns["probability"] = pa.array(best.astype(np.float64))
        columns["model_version"] = pa.array([p.version] * len(out))
        return pa.table(columns), rejected


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


def predict_batch(cfg: PipelineConfig, model_ref: str, input_uri: str, output_uri: str) -> dict:
    """Score the raw shards at `input_uri` with a registered version into a new output folder:
    its manifest (`rows` scored, `rows_rejected` into `<prefix>/_rejects/`)."""
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
            fn_constructor_args=(
                storage,
                mv.path,
                id_col,
                out,
                commit.base,
                cfg.serve.unknown_categories,
            ),
            batch_format="pyarrow",
            batch_size=65_536,  # the model is small: big batches keep per-call overhead down
            concurrency=(1, 2),
            # A fraction of a CPU: a whole one, beside a Serve replica, left the read tasks none
            # on a 2-CPU node and the job waited forever.
            num_cpus=0.5,
            num_gpus=1 if cfg.train.use_gpu else 0,
        ).take_all()
        meta = {"kind": "predictions", "model": mv.ref, "input": input_uri}
        summary = commit_predictions(commit, [w["entry"] for w in written], meta)
    except FileExistsError as e:  # another run wrote this output first
        commit.abort()
        raise FileExistsError(
            f"output {output_uri} exists; predictions never overwrite data"
        ) from e
    except BaseException:
        commit.abort()
        raise
    return summary


def described(manifest: dict, output: str) -> str:
    """What `dcml predict` wrote, for people."""
    text = f"wrote {manifest['rows']} predictions to {output}"
    if manifest["rows_rejected"]:
        folder = "/".join(filter(None, [output.rstrip("/"), manifest.get("prefix"), REJECTS]))
        text += f"\n{manifest['rows_rejected']} rows could not be scored: {folder}/ has their "
        text += "id, field and reason"
    return text


def commit_predictions(commit: Commit, entries: list[str], meta: dict) -> dict:
    """Commit the files `_PredictBatch` calls wrote (their JSON entries), with `meta` and the
    counts of rows scored and rejected: the manifest."""
    files = [json.loads(e) for e in entries]
    rows = sum(f.pop("rows", 0) for f in files)
    rejected = sum(f.pop("rejected", 0) for f in files)
    commit.add(files)
    return commit.commit({**meta, "rows": rows, "rows_rejected": rejected})
