"""The preprocess stage: raw shards -> cleaned, split, transformed, gated, versioned dataset.

A dataset version is `datasets/<name>/<version>/` holding `_manifest.json` and, under the prefix of
the writer that committed it, `<split>/*.parquet` (see dcml.storage for the commit protocol). The
version is the fingerprint of the inputs' bytes and the data config, so a re-run with the same
inputs finds the existing version instead of redoing the work, and concurrent runs of one config
converge on one version: the first manifest wins, the others drop their own files and use it.

Three passes over the data: read and clean each file (one Ray task per file, which also returns
what the fit needs first: counts by drop reason and label, the rows' duplicate keys and a sample
for the quantiles); the moments and category counts of the kept training rows (Ray Data, per-block
partials); then transform, the gate's statistics and the shards' writes in one Ray Data task per
block (again, with a repair, if the gate asks for one).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.expressions import col

from dcml.config import PipelineConfig
from dcml.console import Progress
from dcml.data.catalog import DatasetVersion, find_version
from dcml.data.clean import DROP_REASONS, DUPLICATE, KEEP, ReadAndClean, keep_rows, order_keys
from dcml.data.columns import Columns, class_key, infer_columns
from dcml.data.errors import DataError, data_errors_as_raised
from dcml.data.gate import GateSpec, merge_stats, run_gate
from dcml.data.sources import collect_bundled, in_process, read_schema, resolve_files
from dcml.data.split import SPLITS
from dcml.data.transforms import (
    QUANTILE_SAMPLE,
    ds_to_tables,
    fit_preprocessor,
    sample_threshold,
)
from dcml.data.write import ShardTask, content_hash
from dcml.layout import dataset_folder
from dcml.storage import Commit, Storage

FORMAT = 4  # of the stored layout; part of the fingerprint (4: the training reference)


def preprocess(cfg: PipelineConfig, storage: Storage, log=print) -> DatasetVersion:
    d = cfg.data
    if d.source.startswith("bundled:"):
        source = collect_bundled(storage, d.source.split(":", 1)[1], d.raw_shards)
        options, fmt = storage.options, "parquet"
    else:
        source, fmt = d.source, d.format
        options = storage.options if d.storage_options is None else d.storage_options
    fs, files, fmt = resolve_files(source, fmt, options)

    fingerprint, rows = _fingerprint(cfg, fs, files, fmt)
    version = fingerprint[:12]
    existing = find_version(storage, d.name, version)
    if existing is not None:
        log(f"dataset {existing.ref} already exists for these inputs and config; reusing it")
        return existing
    cols = infer_columns(d, read_schema(fs, files[0], fmt), files[0])
    with data_errors_as_raised():
        return _build(cfg, storage, fs, files, fmt, cols, fingerprint, rows, log)


def _build(
    cfg, storage, fs, files, fmt, cols: Columns, fingerprint: str, rows: int, log
) -> DatasetVersion:
    d, t0 = cfg.data, time.time()
    version = fingerprint[:12]
    log(
        f"reading {len(files)} {fmt} file(s) from {d.source}: "
        f"{len(cols.numeric)} numeric, {len(cols.categorical)} categorical feature(s)"
    )
    clean = ray.put(
        ReadAndClean(fs, files, fmt, cols, cfg.seed, d.split, d.dedupe, d.invalid_labels)
    )
    survey = (cols.task, d.dedupe != "none", cols.numeric, sample_threshold(rows, d.split["train"]))
    ship = in_process(fs)  # memory://: only this process sees the files, so ship their bytes
    tasks = [
        _read_and_survey.remote(clean, i, fs.cat_file(f) if ship else None, survey)
        for i, f in enumerate(files)
    ]
    blocks, surveys = zip(*tasks, strict=True)
    # in the files' order: of several bad files, the first is the one the error names
    with Progress("reading", rows=rows or None, parts=len(files), log=log) as bar:
        surveyed = _awaited(list(surveys), bar)
    reasons, kept, labels, losers, sample = merge_surveys(surveyed)
    cleaned = ray.data.from_arrow_refs(list(blocks))
    n_raw = sum(reasons)
    if not n_raw:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(f"{d.source}: no rows to read ({shown} hold a header or nothing)")
    classes = _classes(cols, labels)
    reasons[DUPLICATE] = len(losers)
    dropped = {DROP_REASONS[k]: int(n) for k, n in enumerate(reasons) if k != KEEP}
    log(
        f"read {n_raw} rows in {time.time() - t0:.1f}s; dropped "
        + (", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none")
    )

    keep = keep_rows(losers, classes, cols.task)
    train = cleaned.map_batches(keep, batch_format="pyarrow", batch_size=None).filter(
        expr=col("_split") == SPLITS.index("train")
    )
    if sample.num_rows < min(QUANTILE_SAMPLE, kept["train"]) // 2:
        # The rows counted before reading overstated the training rows (most were dropped): a
        # pass over the kept training rows takes the sample their number calls for.
        threshold = d.split["train"] * min(1.0, QUANTILE_SAMPLE / max(kept["train"], 1))
        chosen = train.filter(expr=col("_u") < threshold).select_columns(cols.numeric)
        sample = pa.concat_tables(ds_to_tables(chosen))
    pre = fit_preprocessor(train, sample, cols, d)
    features = pre.output_features
    log(f"fitted transforms ({len(features)} model inputs) in {time.time() - t0:.1f}s")

    final = dataset_folder(storage, d.name, version)
    spec = GateSpec(features, cols.task, len(classes or []), files, d.gate)
    train_counts = [labels["train"].get(class_key(c), 0) for c in classes or []]
    written: dict[str, Any] = {}

    def check_round(repair: str | None) -> dict:
        """Transform, check and write every block under a new prefix of this writer's own."""
        if written:
            written["commit"].abort()
        commit = Commit(storage, final)
        task = ShardTask(
            storage,
            commit.base,
            keep,
            pre,
            spec,
            repair,
            d.augment,
            train_counts,
            d.split["train"],
            cfg.seed,
        )
        written["commit"] = commit
        what = "writing repaired shards" if repair else "writing shards"
        parts = _written(cleaned, task, sum(kept.values()) - len(losers), what, log)
        shards = [s for p in parts for s in p["shards"]]
        commit.add([{k: s[k] for k in ("bytes", "sha256")} | {"path": s["name"]} for s in shards])
        for s in shards:  # names relative to the version folder, as the manifest lists them
            s["name"] = commit.relative(s["name"])
        written["shards"] = sorted(shards, key=lambda s: s["name"])
        return merge_stats(spec, [p["stats"] for p in parts if p["stats"]])

    try:
        report, totals = run_gate(spec, check_round)
        log("validation gate passed:\n" + report.table())
        shards = written["shards"]
        rows = {s: sum(x["rows"] for x in shards if x["split"] == s) for s in SPLITS}
        manifest = {
            "name": d.name,
            "version": version,
            "fingerprint": fingerprint,
            "content_hash": content_hash(shards, written["commit"].prefix),
            "created_at": time.time(),
            "source": d.source,
            "format": fmt,
            "source_files": files,
            "task": cols.task,
            "label": "label",
            "id_column": "id",
            "classes": classes,
            "class_counts": totals["classes"] if classes else None,  # before augmentation
            "columns": cols.to_json(),
            "features": features,
            "schema": _schema(storage, final, shards),
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
        manifest = written["commit"].commit(manifest)
    except Exception:
        # A concurrent run of the same inputs and config may have committed this version first
        # (its commit then removes this writer's files, and this commit or a read of them fails):
        # its version is this one's.
        if written:
            written["commit"].abort()
        theirs = find_version(storage, d.name, version)
        if theirs is None:
            raise
        log(f"dataset {theirs.ref} was committed by another run meanwhile; using it")
        return theirs
    except BaseException:
        if written:
            written["commit"].abort()
        raise
    log(
        f"stored dataset {d.name}@{version} in {time.time() - t0:.1f}s: "
        + ", ".join(f"{s} {rows[s]}" for s in SPLITS)
    )
    return DatasetVersion(d.name, version, final, manifest)


def _awaited(refs: list, bar: Progress) -> list:
    """The files' surveys in the files' order (of several bad files, the error names the first),
    each file's rows counted on `bar` as its survey arrives."""
    got, pending = {}, refs
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        for ref in ready:
            try:
                got[ref] = ray.get(ref)
            except Exception:  # raised again below, in the files' order
                pending = []
                break
            bar.update(int(sum(got[ref]["reasons"])))
    return [got[ref] if ref in got else ray.get(ref) for ref in refs]


def _written(ds, task: ShardTask, rows: int, what: str, log) -> list[dict]:
    """`transforms.json_partials(ds, task)`: the shards' task over every block, its results
    parsed; each block's rows counted on a progress bar as its result arrives."""

    def wrap(batch: pa.Table) -> pa.Table:
        return pa.table({"partial": [json.dumps(task(batch))]})

    parts = []
    with Progress(what, rows=rows, log=log) as bar:
        for row in ds.map_batches(wrap, batch_format="pyarrow", batch_size=None).iter_rows():
            parts.append(json.loads(row["partial"]))
            bar.update(sum(s["rows"] - s["augmented"] for s in parts[-1]["shards"]))
    return parts


def _schema(storage: Storage, folder: str, shards: list[dict]) -> dict[str, str]:
    import pyarrow.parquet as pq

    with storage.fs.open(f"{folder}/{shards[0]['name']}", "rb") as f:
        schema = pq.read_schema(f)
    return {n: str(t) for n, t in zip(schema.names, schema.types, strict=True)}


def _classes(cols: Columns, labels: dict[str, Counter]) -> list | None:
    """The class list: declared, or the sorted distinct labels (numbers sort as numbers)."""
    if cols.task == "regression":
        return None
    if cols.classes is not None:
        return list(cols.classes)
    keys = list(set().union(*labels.values()))
    numeric = all(k.lstrip("-").isdigit() for k in keys)
    keys = sorted(keys, key=int) if numeric else sorted(keys)
    if cols.task == "binary" and len(keys) != 2:
        shown = keys[:10]
        raise DataError(
            f"data.task is binary but column {cols.label!r} has {len(keys)} distinct value(s) "
            f"{shown}; set data.task: multiclass, or declare data.classes"
        )
    return [int(k) for k in keys] if numeric else keys


@ray.remote(num_returns=2)
def _read_and_survey(clean: ReadAndClean, index: int, data: bytes | None, survey: tuple):
    """One raw file: its cleaned rows (kept in the object store for the later passes) and the
    survey of them that the driver needs before fitting (`survey_block`). Plain Ray tasks with
    two returns, not a Ray Data pass: a second pass over the cleaned blocks for the survey cost
    as much as reading them."""
    table = clean.read(index, data)
    return table, survey_block(table, *survey)


def survey_block(
    batch: pa.Table, task: str, dedupe: bool, numeric: list[str], threshold: float
) -> dict[str, Any]:
    """What the fit needs from one block of cleaned rows: rows by drop reason, kept rows by
    split and label, the kept rows' 16-byte duplicate keys, and the numeric columns of the kept
    training rows whose hash is under `threshold` (for the quantiles)."""
    drop = batch.column("_drop").to_numpy(zero_copy_only=False)
    counts: dict[str, Any] = {"reasons": np.bincount(drop, minlength=len(DROP_REASONS) + 1)}
    kept = drop == KEEP
    split = batch.column("_split").to_numpy(zero_copy_only=False)
    counts["kept"] = np.bincount(split[kept], minlength=len(SPLITS))

    def of_kept(name: str) -> np.ndarray:  # one column's kept rows, not the whole block's
        return batch.column(name).to_numpy(zero_copy_only=False)[kept]

    if task != "regression":
        codes = pc.dictionary_encode(batch.column("_label")).combine_chunks()
        values = codes.dictionary.to_pylist()
        index = codes.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)[kept]
        split = of_kept("_split").astype(np.int64)
        n = np.bincount(split * (len(values) + 1) + index, minlength=3 * (len(values) + 1))
        n = n.reshape(3, len(values) + 1)[:, : len(values)]
        counts["labels"] = {
            s: {v: int(c) for v, c in zip(values, n[i], strict=True) if c}
            for i, s in enumerate(SPLITS)
        }
    order = order_keys(batch)
    keys = pa.table({"_dup": of_kept("_dup"), "_order": order[kept]}) if dedupe else None
    sampled = kept & (batch.column("_u").to_numpy(zero_copy_only=False) < threshold)
    sample = batch.select(numeric).append_column("_order", pa.array(order))
    return {**counts, "keys": keys, "sample": sample.filter(pa.array(sampled))}


def merge_surveys(
    parts: list[dict],
) -> tuple[list[int], dict[str, int], dict[str, Counter], np.ndarray, pa.Table]:
    """The blocks' surveys -> rows by drop reason; kept rows by split, and by split and label;
    the duplicates to drop (order keys, sorted: all but the first copy of each row, in
    input order); and the quantile sample without them.

    Repeated keys are found by sorting (0.4 s for 5M rows; a hash table took 0.7 s), where Ray
    Data's `groupby` took 7 s for 569 rows on a 2-core node (it starts hash-shuffle actors)."""
    reasons = np.sum([p["reasons"] for p in parts], axis=0)
    kept = dict(zip(SPLITS, np.sum([p["kept"] for p in parts], axis=0).tolist(), strict=True))
    labels = {s: Counter() for s in SPLITS}
    for p in parts:
        for s in SPLITS:
            labels[s].update(p.get("labels", {}).get(s, {}))
    losers = np.empty(0, dtype=np.int64)
    keys = [p["keys"] for p in parts if p["keys"] is not None]
    if keys:
        table = pa.concat_tables(keys)
        dup, order = table.column("_dup").to_numpy(), table.column("_order").to_numpy()
        ordered = np.sort(dup)
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if len(repeated):
            # the rows holding a repeated key: a look-up of each key's low 20 bits in a
            # cache-sized table first, then an exact search among those few candidates
            low = np.uint64((1 << 20) - 1)
            table_bits = np.zeros(1 << 20, dtype=bool)
            table_bits[(repeated & low).astype(np.intp)] = True
            rows = np.flatnonzero(table_bits[(dup & low).astype(np.intp)])
            pos = np.clip(np.searchsorted(repeated, dup[rows]), 0, len(repeated) - 1)
            rows = rows[repeated[pos] == dup[rows]]  # every copy of a repeated row
            dup, order = dup[rows], order[rows]
            by = np.lexsort((order, dup))  # by key, then input order: the first copy first
            first = np.r_[True, dup[by][1:] != dup[by][:-1]]
            losers = np.sort(order[by][~first])
    sample = pa.concat_tables([p["sample"] for p in parts])
    order = sample.column("_order").to_numpy()
    if len(losers) and len(order):
        pos = np.clip(np.searchsorted(losers, order), 0, len(losers) - 1)
        sample = sample.filter(pa.array(losers[pos] != order))
    return reasons.tolist(), kept, labels, losers, sample.drop_columns(["_order"])


def _data_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The data config as stored: never the source's credentials."""
    return cfg.data.model_dump(mode="json", exclude={"storage_options"})


def _fingerprint(cfg: PipelineConfig, fs, files: list[str], fmt: str) -> tuple[str, int]:
    """SHA-256 over the inputs' bytes (with their file names, not their folder: the same files
    under another path or URI are the same inputs), the data config less where the files are,
    and the seed; and about how many rows the files hold (Parquet footers; lines of text), which
    sizes the quantile sample before the files are read."""
    with ThreadPoolExecutor(8) as pool:  # object stores: reads overlap
        digests = list(pool.map(lambda f: _file_sha256(fs, f, fmt), files))
    inputs = {
        "files": [[f.rsplit("/", 1)[-1], h] for f, (h, _) in zip(files, digests, strict=True)],
        "data": {k: v for k, v in _data_config(cfg).items() if k != "source"},
        "seed": cfg.seed,
        "format": FORMAT,
    }
    text = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(text).hexdigest(), sum(n for _, n in digests)


def _file_sha256(fs, path: str, fmt: str) -> tuple[str, int]:
    """A file's SHA-256 and its rows: a Parquet footer's count, else lines (an estimate)."""
    h, lines, returns, tail = hashlib.sha256(), 0, 0, b""
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            lines += chunk.count(b"\n")
            returns += chunk.count(b"\r")  # old Mac line ends: \r alone
            tail = chunk[-8:]
    rows = max(lines, returns) + (bool(tail) and not tail.endswith((b"\n", b"\r")))
    if fmt == "parquet":
        try:
            with fs.open(path, "rb") as f:
                rows = pq.read_metadata(f).num_rows
        except (pa.ArrowException, OSError):
            rows = 0  # not Parquet after all: reading it names the file
    return h.hexdigest(), rows
