"""The preprocess stage: raw shards -> cleaned, split, transformed, gated, versioned dataset.

A dataset version is `datasets/<name>/<version>/` holding `<split>/*.parquet` and `_manifest.json`.
The version is the fingerprint of the inputs (file listing and checksums) and the data config, so a
re-run with the same inputs finds the existing version instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dcml.config import PipelineConfig
from dcml.data.gate import run_gate
from dcml.data.sources import collect_bundled, read_raw, resolve_files
from dcml.data.split import SPLITS, assign_splits
from dcml.data.transforms import Preprocessor, fit_preprocessor
from dcml.storage import Storage

MANIFEST = "_manifest.json"
CLASSES = [0, 1]


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: str
    path: str  # fsspec path of the version folder
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_json(self.manifest["preprocessor"])

    def split_path(self, split: str) -> str:
        return f"{self.path}/{split}"


def preprocess(cfg: PipelineConfig, storage: Storage, log=print) -> DatasetVersion:
    d = cfg.data
    if d.source.startswith("bundled:"):
        raw_dir = collect_bundled(storage, d.source.split(":", 1)[1], d.raw_shards)
        fs, files = storage.fs, sorted(storage.fs.glob(f"{raw_dir}/*.parquet"))
        fmt = "parquet"
    else:
        fs, files = resolve_files(d.source, d.format, storage.options)
        fmt = d.format

    fingerprint = _fingerprint(cfg, fs, files)
    version = fingerprint[:12]
    existing = find_version(storage, d.name, version)
    if existing is not None:
        log(f"dataset {existing.ref} already exists for these inputs and config; reusing it")
        return existing

    ds = read_raw(files, fmt, fs)
    columns = [c for c in ds.schema().names if c != "path"]
    features = d.features or _infer_features(ds.schema(), d.label, d.id_column)
    missing = [c for c in [d.id_column, d.label, *features] if c not in columns]
    if missing:
        raise ValueError(f"{d.source}: column(s) {missing} not found; the data has {columns}")

    n_raw = ds.count()
    cleaned = ds.map_batches(
        _clean_and_split(features, d.label, d.id_column, cfg.seed, d.split), batch_format="pyarrow"
    ).materialize()
    n_clean = cleaned.count()
    log(f"read {n_raw} rows from {len(files)} file(s); {n_raw - n_clean} dropped (missing label)")

    pre = fit_preprocessor(cleaned.filter(expr="_split == 'train'"), features, d.scaling)
    transformed = cleaned.map_batches(_apply(pre), batch_format="pyarrow").materialize()
    gated, report = run_gate(transformed, features, CLASSES, d.min_rows_per_split, d.repair_rounds)
    log("validation gate passed:\n" + report.table())

    parent = storage.path("datasets", d.name)
    storage.fs.makedirs(parent, exist_ok=True)
    tmp = storage.tmp_dir(parent)
    try:
        rows, shards = {}, {}
        for split in SPLITS:
            part = gated.filter(expr=f"_split == '{split}'").drop_columns(["_split", "path"])
            part.write_parquet(f"{tmp}/{split}", filesystem=storage.arrow_fs())
            shards[split] = storage.ls(f"{tmp}/{split}")
            rows[split] = part.count()
        schema = gated.drop_columns(["_split", "path"]).schema()
        manifest = {
            "name": d.name,
            "version": version,
            "fingerprint": fingerprint,
            "created_at": time.time(),
            "source": d.source,
            "files": files,
            "task": d.task,
            "label": "label",
            "id_column": "id",
            "classes": CLASSES,
            "features": features,
            "schema": {n: str(t) for n, t in zip(schema.names, schema.types, strict=True)},
            "rows": {
                "raw": n_raw,
                "dropped_missing_label": n_raw - n_clean,
                "repaired": report.repaired_rows,
                **rows,
            },
            "shards": shards,
            "preprocessor": pre.to_json(),
            "gate": report.to_json(),
            "config": {"seed": cfg.seed, "data": d.model_dump()},
        }
        final = f"{parent}/{version}"
        storage.commit_dir(tmp, final)
        # The manifest is the commit marker: a folder without one is not a version.
        storage.write_json(f"{final}/{MANIFEST}", manifest)
    except BaseException:
        storage.remove(tmp)
        raise
    log(f"stored dataset {d.name}@{version}: " + ", ".join(f"{s} {rows[s]}" for s in SPLITS))
    return DatasetVersion(d.name, version, final, manifest)


def _fingerprint(cfg: PipelineConfig, fs, files: list[str]) -> str:
    inputs = {
        "files": [[f, fs.checksum(f)] for f in files],
        "data": cfg.data.model_dump(),
        "seed": cfg.seed,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _infer_features(schema, label: str, id_column: str) -> list[str]:
    return [
        n
        for n, t in zip(schema.names, schema.types, strict=True)
        if n not in (label, id_column, "path")
        and (pa.types.is_integer(t) or pa.types.is_floating(t))
    ]


def _clean_and_split(features, label, id_column, seed, fractions):
    def clean(batch: pa.Table) -> pa.Table:
        batch = batch.filter(pc.is_valid(batch.column(label)))
        ids = batch.column(id_column)
        out = {"id": ids}
        for c in features:
            out[c] = pc.cast(batch.column(c), pa.float64())
        out["label"] = pc.cast(batch.column(label), pa.int64())
        out["_split"] = pa.array(assign_splits(ids.to_numpy(zero_copy_only=False), seed, fractions))
        out["path"] = batch.column("path")
        return pa.table(out)

    return clean


def _apply(pre: Preprocessor):
    def transform(batch: pa.Table) -> pa.Table:
        x = pre.transform({c: batch.column(c) for c in pre.features})
        out = {"id": batch.column("id"), "label": batch.column("label")}
        out.update({c: pa.array(x[:, j]) for j, c in enumerate(pre.features)})
        out["_split"], out["path"] = batch.column("_split"), batch.column("path")
        return pa.table(out)

    return transform


def find_version(storage: Storage, name: str, version: str) -> DatasetVersion | None:
    path = storage.path("datasets", name, version)
    if not storage.exists(f"{path}/{MANIFEST}"):
        return None
    return DatasetVersion(name, version, path, storage.read_json(f"{path}/{MANIFEST}"))


def list_versions(storage: Storage, name: str) -> list[DatasetVersion]:
    found = [find_version(storage, name, v) for v in storage.ls(storage.path("datasets", name))]
    return sorted((v for v in found if v), key=lambda v: v.manifest["created_at"])


def resolve_dataset(storage: Storage, ref: str) -> DatasetVersion:
    """'name', 'name@latest' or 'name@<version>' -> the committed dataset version."""
    name, _, version = ref.partition("@")
    if version in ("", "latest"):
        versions = list_versions(storage, name)
        if not versions:
            raise LookupError(
                f"no committed versions of dataset {name!r} in {storage.uri('datasets')}"
            )
        return versions[-1]
    found = find_version(storage, name, version)
    if found is None:
        known = [v.version for v in list_versions(storage, name)]
        raise LookupError(f"dataset {name}@{version} not found; versions: {known or 'none'}")
    return found


def read_split_numpy(
    storage: Storage, dv: DatasetVersion, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, X, y) of one split, read with plain pyarrow: for evaluation on the driver."""
    import pyarrow.dataset as pads

    table = pads.dataset(
        dv.split_path(split), filesystem=storage.arrow_fs(), format="parquet"
    ).to_table()
    x = np.stack([table.column(c).to_numpy() for c in dv.manifest["features"]], axis=1)
    return table.column("id").to_numpy(), x.astype(np.float32), table.column("label").to_numpy()
