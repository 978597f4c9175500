"""Raw data: the bundled data set, collected into storage as shards, and reading raw shards."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcml.storage import Storage

BUNDLED = {"breast_cancer"}
SUFFIXES = {"parquet": (".parquet",), "csv": (".csv",), "json": (".json", ".jsonl")}


def breast_cancer_table() -> pa.Table:
    """scikit-learn's breast-cancer data (569 rows, 30 features); label 1 means malignant."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    columns = {"id": pa.array(np.arange(len(bunch.target), dtype=np.int64))}
    for j, name in enumerate(bunch.feature_names):
        columns[str(name)] = pa.array(bunch.data[:, j].astype(np.float64))
    # sklearn codes benign as 1; a diagnosis model flags the malignant class as positive.
    columns["label"] = pa.array((bunch.target == 0).astype(np.int64))
    return pa.table(columns)


def collect_bundled(storage: Storage, name: str, shards: int) -> str:
    """Write a bundled data set as Parquet shards under raw/<name>/ once; return that folder."""
    if name not in BUNDLED:
        raise ValueError(
            f"unknown bundled data set {name!r}; bundled: {', '.join(sorted(BUNDLED))}"
        )
    final = storage.path("raw", name)
    if storage.exists(final):
        return final
    table = breast_cancer_table()
    parent = storage.path("raw")
    storage.fs.makedirs(parent, exist_ok=True)
    tmp = storage.tmp_dir(parent)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    for i in range(shards):
        buf = io.BytesIO()
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), buf)
        with storage.fs.open(f"{tmp}/part-{i:05d}.parquet", "wb") as f:
            f.write(buf.getvalue())
    try:
        storage.commit_dir(tmp, final)
    except FileExistsError:  # another process collected it first: theirs is as good
        storage.remove(tmp)
    return final


def resolve_files(
    uri: str, fmt: str, storage_options: dict
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """A file, a folder or a glob -> the sorted list of data files in it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if any(ch in path for ch in "*?["):
        files = fs.glob(path)
    elif fs.isdir(path):
        files = [p for p in fs.find(path) if p.rsplit("/", 1)[-1].endswith(SUFFIXES[fmt])]
    elif fs.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"raw data not found: {uri}")
    files = sorted(f for f in files if not f.rsplit("/", 1)[-1].startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"no {fmt} files under {uri}")
    return fs, files


def read_raw(files: list[str], fmt: str, fs: fsspec.AbstractFileSystem):
    """Read raw shards into a Ray Dataset (one read task per file or more)."""
    import ray.data
    from fsspec.implementations.local import LocalFileSystem

    filesystem = (
        None if isinstance(fs, LocalFileSystem) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    )
    reader = {
        "parquet": ray.data.read_parquet,
        "csv": ray.data.read_csv,
        "json": ray.data.read_json,
    }
    return reader[fmt](files, filesystem=filesystem, include_paths=True)
