"""The last pass: transform, gate statistics and Parquet shards, one task per block of rows.

Each task keeps the good rows of one block of cleaned data, applies the fitted transforms (and, in
a repair round, the gate's repair), computes the gate's statistics, augments the training rows and
writes one Parquet file per split under the version's temporary folder. It returns the statistics
and the files' names, row counts and SHA-256; nothing is committed until the gate has passed on
the merged statistics. Shard names come from the block's first source row, so the same inputs
always give the same names. Fusing these steps into one pass saved two materialisations of the
whole data set (see docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcml.config_sections import AugmentConfig
from dcml.data.gate import GateSpec, block_stats, repair_batch
from dcml.data.split import SPLITS
from dcml.data.transforms import Preprocessor


@dataclass(frozen=True)
class ShardTask:
    """One pass per block of cleaned rows: keep, transform, (repair), gate statistics, write."""

    storage: Any  # dcml.storage.Storage
    folder: str  # this writer's prefix in the version folder
    keep: Callable[[pa.Table], pa.Table]  # drops marked rows and duplicates, encodes the label
    pre: Preprocessor
    spec: GateSpec
    repair: str | None  # None in the gate's first round
    augment: AugmentConfig
    train_class_counts: list[int]  # for oversampling; empty for regression
    train_fraction: float
    seed: int

    def __call__(self, batch: pa.Table) -> dict:
        if not batch.num_rows:
            return {"stats": None, "shards": []}
        file0, row0 = int(batch.column("_file")[0].as_py()), int(batch.column("_row")[0].as_py())
        table = self.transform(self.keep(batch))
        if self.repair:
            table = repair_batch(self.spec, table, self.repair)
        stats = block_stats(self.spec, table)
        shards = []
        for code, split in enumerate(SPLITS):
            part = table.filter(pc.equal(table.column("_split"), code))
            if not part.num_rows:
                continue
            original = part.num_rows
            if split == "train":
                part = self._augment(part, file0, row0)
            buf = io.BytesIO()
            # Dictionary encoding where values repeat (the label, one-hot and ordinal columns),
            # not on ids and scaled numbers: a write took a third of the time, files 1/3 smaller.
            repeated = ["label", *self.spec.features[len(self.pre.numeric) :]]
            pq.write_table(
                part.select(["id", "label", *self.spec.features]), buf, use_dictionary=repeated
            )
            data = buf.getvalue()
            name = f"{split}/part-{file0:05d}-{row0:09d}.parquet"
            self.storage.write_bytes(f"{self.folder}/{name}", data)
            shards.append(
                {
                    "split": split,
                    "name": name,
                    "rows": part.num_rows,
                    "augmented": part.num_rows - original,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                }
            )
        return {"stats": stats, "shards": shards}

    def transform(self, batch: pa.Table) -> pa.Table:
        x = self.pre.transform({c: batch.column(c) for c in self.pre.inputs}, order="F")
        out = {"id": batch.column("id"), "label": batch.column("label")}
        out.update({c: pa.array(x[:, j]) for j, c in enumerate(self.spec.features)})
        for c in ("_split", "_u", "_file", "_row"):
            out[c] = batch.column(c)
        return pa.table(out)

    def _augment(self, part: pa.Table, file0: int, row0: int) -> pa.Table:
        a = self.augment
        if a.oversample and self.train_class_counts:
            counts = np.asarray(self.train_class_counts, dtype=np.float64)
            factor = counts.max() / np.maximum(counts, 1)
            label = part.column("label").to_numpy(zero_copy_only=False).astype(int)
            f = factor[label]
            # Deterministic fractional repeats: the row hash decides who gets the extra copy.
            u = part.column("_u").to_numpy(zero_copy_only=False) / self.train_fraction
            repeats = np.floor(f).astype(int) + (u < f - np.floor(f))
            part = part.take(pa.array(np.repeat(np.arange(part.num_rows), repeats)))
        continuous = self.pre.numeric  # one-hot columns take no noise
        if a.noise_std > 0 and continuous:
            rng = np.random.default_rng([self.seed, file0, row0])
            copies = [part]
            for _ in range(a.noise_copies):
                noisy = part
                for c in continuous:
                    i = noisy.schema.get_field_index(c)
                    v = noisy.column(c).to_numpy(zero_copy_only=False)
                    v = (v + rng.normal(0.0, a.noise_std, len(v))).astype(np.float32)
                    noisy = noisy.set_column(i, c, pa.array(v))
                copies.append(noisy)
            part = pa.concat_tables(copies)
        return part


def content_hash(shards: list[dict], prefix: str = "") -> str:
    """One SHA-256 over every shard's name (below the writer's prefix) and SHA-256: equal
    hashes, equal data, whichever writer stored it."""
    h = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s["name"]):
        h.update(f"{s['name'].removeprefix(prefix + '/')} {s['sha256']}\n".encode())
    return h.hexdigest()
