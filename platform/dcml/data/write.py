"""Writing a dataset version's shards: one Parquet file per split per block, in parallel.

Each task writes its files under the version's temporary folder and returns their names, row
counts and SHA-256, from which the manifest's shard list and content hash are built. Shard names
come from the first source row of the block, so the same inputs always give the same names.
Augmentation of the training split happens here, on the way out.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcml.config import AugmentConfig
from dcml.data.split import SPLITS


@dataclass(frozen=True)
class ShardWriter:
    fs: Any
    folder: str
    columns: list[str]  # id, label, features: what training reads
    continuous: list[str]  # features that take noise
    augment: AugmentConfig
    train_class_counts: list[int]  # for oversampling; empty for regression
    train_fraction: float
    seed: int

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        if not batch.num_rows:
            return _results(out)
        file0, row0 = int(batch.column("_file")[0].as_py()), int(batch.column("_row")[0].as_py())
        for split in SPLITS:
            part = batch.filter(pc.equal(batch.column("_split"), split))
            if not part.num_rows:
                continue
            original = part.num_rows
            if split == "train":
                part = self._augment(part, file0, row0)
            buf = io.BytesIO()
            pq.write_table(part.select(self.columns), buf)
            data = buf.getvalue()
            name = f"{split}/part-{file0:05d}-{row0:09d}.parquet"
            with self.fs.open(f"{self.folder}/{name}", "wb") as f:
                f.write(data)
            out.append(
                {
                    "split": split,
                    "name": name,
                    "rows": part.num_rows,
                    "augmented": part.num_rows - original,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                }
            )
        return _results(out)

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
        if a.noise_std > 0 and self.continuous:
            rng = np.random.default_rng([self.seed, file0, row0])
            copies = [part]
            for _ in range(a.noise_copies):
                noisy = part
                for c in self.continuous:
                    i = noisy.schema.get_field_index(c)
                    v = noisy.column(c).to_numpy(zero_copy_only=False)
                    v = (v + rng.normal(0.0, a.noise_std, len(v))).astype(np.float32)
                    noisy = noisy.set_column(i, c, pa.array(v))
                copies.append(noisy)
            part = pa.concat_tables(copies)
        return part


RESULT_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("name", pa.string()),
        ("rows", pa.int64()),
        ("augmented", pa.int64()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
    ]
)


def _results(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def content_hash(shards: list[dict]) -> str:
    """One SHA-256 over every shard's name and SHA-256: equal hashes, equal data."""
    h = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s["name"]):
        h.update(f"{s['name']} {s['sha256']}\n".encode())
    return h.hexdigest()
