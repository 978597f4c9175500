"""Large synthetic tabular data for benchmarks and scale tests, written in parallel by Ray tasks.

Numeric and categorical features, a learnable binary label (a logistic model of both), and the dirt
that cleaning is for: missing values, outliers, missing labels and duplicated rows.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dcml.storage import Commit, Storage, file_entry, require_new_output

COLORS = ["red", "green", "blue", "black", "white"]
REGIONS = [f"r{i:02d}" for i in range(20)]
SUFFIX = {"parquet": "parquet", "csv": "csv", "json": "jsonl"}


def synth_table(rows: int, shard: int, first_id: int, seed: int = 0, numeric: int = 8) -> pa.Table:
    """One shard: deterministic in (seed, shard)."""
    rng = np.random.default_rng([seed, shard])
    weights = np.random.default_rng(seed).normal(0, 1, numeric)  # the same model in every shard
    x = rng.normal(0.0, 1.0, (rows, numeric))
    color = rng.integers(0, len(COLORS), rows)
    region = rng.integers(0, len(REGIONS), rows)
    logit = x @ weights / np.sqrt(numeric) * 2.5 + (color == 0) * 1.5 - (region % 4 == 1) * 1.0
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)

    scales = 10.0 ** (np.arange(numeric) % 4)  # features on different scales
    values = x * scales + np.arange(numeric)
    outliers = rng.random((rows, numeric)) < 0.005
    values[outliers] *= 50.0
    values[rng.random((rows, numeric)) < 0.01] = np.nan

    columns: dict[str, Any] = {"id": pa.array(first_id + np.arange(rows, dtype=np.int64))}
    for j in range(numeric):
        columns[f"num_{j}"] = pa.array(values[:, j])
    color_names = np.array(COLORS, dtype=object)[color]
    color_names[rng.random(rows) < 0.01] = None
    columns["color"] = pa.array(color_names, pa.string())
    columns["region"] = pa.array(np.array(REGIONS, dtype=object)[region], pa.string())
    columns["label"] = pa.array(label, mask=rng.random(rows) < 0.002)
    table = pa.table(columns)
    dups = np.flatnonzero(rng.random(rows) < 0.002)  # exact copies, as a re-sent export has
    return pa.concat_tables([table, table.take(pa.array(dups))]) if len(dups) else table


def encode(table: pa.Table, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buf)
    elif fmt == "csv":
        pacsv.write_csv(table, buf)
    else:
        return table.to_pandas().to_json(orient="records", lines=True).encode()
    return buf.getvalue()


def write_synth(
    out_uri: str,
    rows: int,
    shards: int,
    fmt: str = "parquet",
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write `rows` rows (plus 0.2% duplicates) in `shards` files under a new out_uri."""
    import ray.data

    if fmt not in SUFFIX:
        raise ValueError(f"format must be one of {sorted(SUFFIX)}, not {fmt!r}")
    out = Storage(out_uri, storage_options)
    require_new_output(out, out.root, out_uri)
    commit = Commit(out, out.root)
    bounds = np.linspace(0, rows, shards + 1).astype(np.int64)

    def write(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = []
        for shard in batch["id"]:
            shard = int(shard)
            lo, hi = int(bounds[shard]), int(bounds[shard + 1])
            name = f"part-{shard:05d}.{SUFFIX[fmt]}"
            data = encode(synth_table(hi - lo, shard, lo, seed), fmt)
            out.write_bytes(f"{commit.base}/{name}", data)
            entries.append(json.dumps(file_entry(name, data)))
        return {"entry": np.array(entries)}

    try:
        written = (
            ray.data.range(shards, override_num_blocks=shards)
            .map_batches(write, batch_size=1)
            .take_all()
        )
        commit.add([json.loads(w["entry"]) for w in written])
        commit.commit({"kind": "synthetic", "rows": rows, "format": fmt, "seed": seed})
    except BaseException:
        commit.abort()
        raise
    return sorted(out.to_uri(f"{out.root}/{e['path']}") for e in commit.files)
