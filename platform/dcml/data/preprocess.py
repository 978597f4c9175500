"""The preprocess stage: raw shards -> cleaned, split, transformed, gated, versioned dataset.

A dataset version is `datasets/<name>/<version>/` holding `<split>/*.parquet` and `_manifest.json`.
The version is the fingerprint of the inputs (file listing and checksums) and the data config, so a
re-run with the same inputs finds the existing version instead of redoing the work.

Passes over the data, all on Ray Data: read and clean each file (one task per file); count drops and
labels; find duplicates (group by row hash); keep the good rows; fit the transforms on the training
split; transform; the gate's checks (and repairs); write the shards.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from dcml.config import PipelineConfig
from dcml.data.clean import DROP_REASONS, DUPLICATE, KEEP, ReadAndClean
from dcml.data.columns import Columns, infer_columns
from dcml.data.errors import DataError, find_data_error
from dcml.data.gate import GateSpec, run_gate
from dcml.data.sources import collect_bundled, read_schema, resolve_files
from dcml.data.split import SPLITS
from dcml.data.transforms import Preprocessor, fit_preprocessor, json_partials
from dcml.data.write import ShardWriter, content_hash
from dcml.storage import Storage

MANIFEST = "_manifest.json"
FORMAT = 2  # of the stored layout; part of the fingerprint


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
    def features(self) -> list[str]:
        return self.manifest["features"]

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_json(self.manifest["preprocessor"])

    def split_path(self, split: str) -> str:
        return f"{self.path}/{split}"


def preprocess(cfg: PipelineConfig, storage: Storage, log=print) -> DatasetVersion:
    d = cfg.data
    if d.source.startswith("bundled:"):
        source = collect_bundled(storage, d.source.split(":", 1)[1], d.raw_shards)
        options, fmt = storage.options, "parquet"
    else:
        source, fmt = d.source, d.format
        options = storage.options if d.storage_options is None else d.storage_options
    fs, files, fmt = resolve_files(source, fmt, options)

    fingerprint = _fingerprint(cfg, fs, files)
    version = fingerprint[:12]
    existing = find_version(storage, d.name, version)
    if existing is not None:
        log(f"dataset {existing.ref} already exists for these inputs and config; reusing it")
        return existing
    cols = infer_columns(d, read_schema(fs, files[0], fmt), files[0])
    ctx = ray.data.DataContext.get_current()
    # A DataError raised in a task reaches us as itself, not as a generic UserCodeException.
    saved, ctx.raise_original_map_exception = ctx.raise_original_map_exception, True
    try:
        return _build(cfg, storage, fs, files, fmt, cols, fingerprint, log)
    except Exception as e:
        found = find_data_error(e)
        if found is None or type(found) is DataError and found is e:
            raise
        raise DataError(_message(found)) from None  # without Ray's task wrappers
    finally:
        ctx.raise_original_map_exception = saved


def _message(e: DataError) -> str:
    """The message of a DataError that came back from a task, without Ray's traceback text."""
    text, marker = str(e), "DataError: "
    if marker not in text:
        return text
    return text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]


def _build(cfg, storage, fs, files, fmt, cols: Columns, fingerprint, log) -> DatasetVersion:
    d, t0 = cfg.data, time.time()
    version = fingerprint[:12]
    log(
        f"reading {len(files)} {fmt} file(s) from {d.source}: "
        f"{len(cols.numeric)} numeric, {len(cols.categorical)} categorical feature(s)"
    )
    cleaned = (
        ray.data.from_items(
            [{"file": i} for i in range(len(files))], override_num_blocks=len(files)
        )
        .map_batches(
            ReadAndClean(fs, files, fmt, cols, cfg.seed, d.split, d.dedupe, d.invalid_labels),
            batch_size=1,
            batch_format="numpy",
        )
        .materialize()
    )
    reasons, labels, n_raw = _tally(cleaned, cols.task)
    classes = _classes(cols, labels)
    losers, reasons[DUPLICATE] = _duplicates(cleaned) if d.dedupe != "none" else ({}, 0)
    kept = cleaned.map_batches(
        _keep(losers, classes, cols.task), batch_format="pyarrow", batch_size=None
    ).materialize()
    del cleaned
    dropped = {DROP_REASONS[k]: int(n) for k, n in enumerate(reasons) if k != KEEP}
    log(
        f"read {n_raw} rows in {time.time() - t0:.1f}s; dropped "
        + (", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none")
    )

    train = kept.filter(expr="_split == 'train'")
    pre = fit_preprocessor(train, train.count(), cols, d, d.split["train"])
    features = pre.output_features
    transformed = kept.map_batches(
        _apply(pre, features), batch_format="pyarrow", batch_size=None
    ).materialize()
    del kept
    log(f"fitted and applied transforms ({len(features)} model inputs) in {time.time() - t0:.1f}s")

    spec = GateSpec(features, cols.task, len(classes or []), files, d.gate)
    gated, report, totals = run_gate(transformed, spec)
    log("validation gate passed:\n" + report.table())

    parent = storage.path("datasets", d.name)
    final = f"{parent}/{version}"
    if storage.exists(final):  # debris of a crashed commit: no manifest, so not a version
        log(f"removing {storage.to_uri(final)}: an incomplete earlier write")
        storage.remove(final)
    storage.fs.makedirs(parent, exist_ok=True)
    tmp = storage.tmp_dir(parent)
    try:
        for split in SPLITS:
            storage.fs.makedirs(f"{tmp}/{split}", exist_ok=True)
        writer = ShardWriter(
            fs=storage.fs,
            folder=tmp,
            columns=["id", "label", *features],
            continuous=list(cols.numeric),
            augment=d.augment,
            train_class_counts=totals["classes"]["train"] if classes else [],
            train_fraction=d.split["train"],
            seed=cfg.seed,
        )
        shards = gated.map_batches(writer, batch_format="pyarrow", batch_size=None).take_all()
        shards = sorted(shards, key=lambda s: s["name"])
        rows = {s: sum(x["rows"] for x in shards if x["split"] == s) for s in SPLITS}
        schema = gated.select_columns(["id", "label", *features]).schema()
        manifest = {
            "name": d.name,
            "version": version,
            "fingerprint": fingerprint,
            "content_hash": content_hash(shards),
            "created_at": time.time(),
            "source": d.source,
            "format": fmt,
            "files": files,
            "task": cols.task,
            "label": "label",
            "id_column": "id",
            "classes": classes,
            "columns": cols.to_json(),
            "features": features,
            "schema": {n: str(t) for n, t in zip(schema.names, schema.types, strict=True)},
            "rows": {
                "raw": n_raw,
                "dropped": {**dropped, "gate_repair": report.dropped_rows},
                "augmented": sum(x["augmented"] for x in shards),
                **rows,
            },
            "shards": shards,
            "preprocessor": pre.to_json(),
            "gate": report.to_json(),
            "config": {"seed": cfg.seed, "data": _data_config(cfg)},
        }
        storage.commit_with_marker(tmp, final, MANIFEST, manifest)
    except BaseException:
        storage.remove(tmp)
        raise
    log(
        f"stored dataset {d.name}@{version} in {time.time() - t0:.1f}s: "
        + ", ".join(f"{s} {rows[s]}" for s in SPLITS)
    )
    return DatasetVersion(d.name, version, final, manifest)


def _tally(ds, task: str) -> tuple[list[int], Counter, int]:
    """Rows by drop reason, and kept rows by label (classification)."""

    def tally(batch: pa.Table) -> dict:
        drop = batch.column("_drop").to_numpy(zero_copy_only=False)
        labels = {}
        if task != "regression":
            vc = pc.value_counts(pc.drop_null(batch.column("_label").filter(pa.array(drop == 0))))
            labels = dict(zip(vc.field(0).to_pylist(), vc.field(1).to_pylist(), strict=True))
        return {
            "reasons": np.bincount(drop, minlength=len(DROP_REASONS) + 1).tolist(),
            "labels": labels,
        }

    reasons, labels = np.zeros(len(DROP_REASONS) + 1, dtype=np.int64), Counter()
    for part in json_partials(ds, tally):
        reasons += np.asarray(part["reasons"])
        labels.update(part["labels"])
    return reasons.tolist(), labels, int(reasons.sum())


def _classes(cols: Columns, labels: Counter) -> list | None:
    """The class list: declared, or the sorted distinct labels (numbers sort as numbers)."""
    if cols.task == "regression":
        return None
    if cols.classes is not None:
        return list(cols.classes)
    keys = list(labels)
    numeric = all(k.lstrip("-").isdigit() for k in keys)
    keys = sorted(keys, key=int) if numeric else sorted(keys)
    if cols.task == "binary" and len(keys) != 2:
        shown = keys[:10]
        raise DataError(
            f"data.task is binary but column {cols.label!r} has {len(keys)} distinct value(s) "
            f"{shown}; set data.task: multiclass, or declare data.classes"
        )
    return [int(k) for k in keys] if numeric else keys


def _duplicates(ds) -> tuple[dict[int, int], int]:
    """{row hash: the (file, row) order of the copy to keep} for duplicated rows; rows dropped.

    Each block sends only its rows' 16-byte keys; grouping them on the driver took 0.2 s where
    Ray Data's `groupby` took 7 s (hash-shuffle actors) on a 2-core node.
    """
    from dcml.data.transforms import ds_to_tables

    def keys(batch: pa.Table) -> pa.Table:
        keep = pc.equal(batch.column("_drop"), KEEP)
        order = (
            batch.column("_file").to_numpy(zero_copy_only=False).astype(np.int64) << 32
        ) + batch.column("_row").to_numpy(zero_copy_only=False)
        return pa.table({"_dup": batch.column("_dup"), "_order": order}).filter(keep)

    table = pa.concat_tables(
        ds_to_tables(ds.map_batches(keys, batch_format="pyarrow", batch_size=None))
    )
    h = table.column("_dup").to_numpy()
    order = table.column("_order").to_numpy()
    by = np.lexsort((order, h))  # by hash, then by (file, row): the first of a run is kept
    h, order = h[by], order[by]
    first = np.r_[True, h[1:] != h[:-1]]
    repeated = ~first
    dup_hashes = np.unique(h[repeated])
    keep_at = np.flatnonzero(first)[np.isin(h[first], dup_hashes)]
    return {int(h[i]): int(order[i]) for i in keep_at}, int(repeated.sum())


def _keep(losers: dict[int, int], classes: list | None, task: str):
    """Drop marked rows and all but the first copy of duplicates; encode the label."""
    from dcml.data.columns import class_key

    dup_keys = np.array(sorted(losers), dtype=np.uint64)
    keepers = np.array([losers[k] for k in sorted(losers)], dtype=np.int64)
    class_keys = pa.array([class_key(c) for c in classes or []], pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        ok = batch.column("_drop").to_numpy(zero_copy_only=False) == KEEP
        if len(dup_keys):
            h = batch.column("_dup").to_numpy(zero_copy_only=False)
            pos = np.clip(np.searchsorted(dup_keys, h), 0, len(dup_keys) - 1)
            order = (
                batch.column("_file").to_numpy(zero_copy_only=False).astype(np.int64) << 32
            ) + batch.column("_row").to_numpy(zero_copy_only=False)
            ok &= ~((dup_keys[pos] == h) & (keepers[pos] != order))
        batch = batch.filter(pa.array(ok))
        if task == "regression":
            label = pc.cast(batch.column("_label"), pa.float64())
        else:
            label = pc.cast(pc.index_in(batch.column("_label"), value_set=class_keys), pa.int64())
        batch = batch.drop_columns(["_label", "_drop", "_dup"])
        return batch.append_column("label", label)

    return keep


def _apply(pre: Preprocessor, features: list[str]):
    def transform(batch: pa.Table) -> pa.Table:
        x = pre.transform({c: batch.column(c) for c in pre.inputs})
        out = {"id": batch.column("id"), "label": batch.column("label")}
        out.update({c: pa.array(x[:, j]) for j, c in enumerate(features)})
        for c in ("_split", "_u", "_file", "_row"):
            out[c] = batch.column(c)
        return pa.table(out)

    return transform


def _data_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The data config as stored and fingerprinted: never the source's credentials."""
    return cfg.data.model_dump(mode="json", exclude={"storage_options"})


def _fingerprint(cfg: PipelineConfig, fs, files: list[str]) -> str:
    inputs = {
        "files": [[f, fs.checksum(f)] for f in files],
        "data": _data_config(cfg),
        "seed": cfg.seed,
        "format": FORMAT,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


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
