"""Raw data: finding shards on any fsspec URI, reading one shard, and the bundled data set.

Each raw file is read by one Ray Data task with `read_file`, so a file that cannot be read, lacks a
column or changed a column's type stops the stage with an error that names that file.
"""

from __future__ import annotations

import io
import json
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dcml.data.errors import DataError
from dcml.layout import MANIFEST, raw_folder
from dcml.storage import TX_PREFIX, Commit, Storage, lists_files, read_manifest

BUNDLED = {"breast_cancer"}
SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "json": (".json", ".jsonl")}


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
    """Write a bundled data set as Parquet shards under raw/<name>/ once; return its URI."""
    if name not in BUNDLED:
        raise DataError(f"unknown bundled data set {name!r}; bundled: {', '.join(sorted(BUNDLED))}")
    final = raw_folder(storage, name)
    if read_manifest(storage, final) is None:
        table = breast_cancer_table()
        commit = Commit(storage, final)
        bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
        try:
            for i in range(shards):
                buf = io.BytesIO()
                pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), buf)
                commit.put(f"part-{i:05d}.parquet", buf.getvalue())
            commit.commit({"kind": "raw", "source": f"bundled:{name}"})
        except Exception:  # another process collected it first (theirs is as good), or not
            commit.abort()
            if read_manifest(storage, final) is None:
                raise
        except BaseException:
            commit.abort()
            raise
    return storage.to_uri(final)


def format_of(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    for fmt, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def resolve_files(
    uri: str, fmt: str, storage_options: dict
) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """A file, a folder or a glob -> (filesystem, sorted data files, their format)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except (ImportError, ValueError) as e:
        raise DataError(f"{uri}: cannot open this location: {e}") from e
    if any(ch in path for ch in "*?["):
        base = path[: min(path.find(ch) % (len(path) + 1) for ch in "*?[")].rsplit("/", 1)[0]
        files = _committed_only(fs, [f for f in fs.glob(path) if _visible(f, base)])
        if not files and fs.exists(f"{base}/{MANIFEST}"):
            raise DataError(
                f"no files match {uri}: {base} is a folder dcml wrote (its files are under a "
                f"{TX_PREFIX}* folder that its {MANIFEST} lists); give the folder itself"
            )
    elif fs.isdir(path):
        files = _folder_files(fs, path.rstrip("/"), uri)
        if fmt != "auto":
            files = [p for p in files if format_of(p) in (fmt, None)]
        else:
            files = [p for p in files if format_of(p)]
    elif fs.exists(path):
        files = [path]
    else:
        raise DataError(f"raw data not found: {uri}")
    files = sorted(files)
    if not isinstance(fs, LocalFileSystem):  # full URIs: for messages, and fs.open takes them
        files = [fs.unstrip_protocol(f) for f in files]
    if not files:
        raise DataError(f"no {'data' if fmt == 'auto' else fmt} files under {uri}")
    if fmt == "auto":
        found = {format_of(f) for f in files}
        if None in found or len(found) != 1:
            raise DataError(
                f"{uri}: cannot tell the format from the file names ({files[0]}, ...); "
                "set data.format to parquet, csv or json"
            )
        fmt = found.pop()
    return fs, files, fmt


def _visible(path: str, base: str) -> bool:
    """Whether no part of path below base starts with '.' or '_': temporary folders, crash
    debris and markers (`.tmp-*`, `_temporary/`, `_SUCCESS`, `_manifest.json`) are not data."""
    rel = path[len(base) :].strip("/") if path.startswith(base) else path.rsplit("/", 1)[-1]
    return not any(part.startswith((".", "_")) for part in rel.split("/"))


def _committed_only(fs: fsspec.AbstractFileSystem, files: list[str]) -> list[str]:
    """Files matched inside folders that dcml wrote: only those their folder's manifest lists
    (never a crashed or losing writer's)."""
    manifests: dict[str, set[str]] = {}
    kept = []
    for f in files:
        found = re.search(rf"^(.*)/({TX_PREFIX}[^/]+/.*)$", f)
        if found is None:
            kept.append(f)
            continue
        folder, rel = found[1], found[2]
        if folder not in manifests:
            try:
                manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))
                manifests[folder] = {e["path"] for e in manifest.get("files", [])}
            except FileNotFoundError:
                manifests[folder] = set()
        if rel in manifests[folder]:
            kept.append(f)
    return kept


def _folder_files(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> list[str]:
    """A folder's data files: the ones its manifest lists if it is something dcml committed,
    else every visible file under it."""
    try:
        manifest = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    except FileNotFoundError:
        manifest = None
    if manifest is not None and lists_files(manifest):  # not `_` names (a predictions' _rejects/)
        listed = [f"{path}/{e['path']}" for e in manifest["files"]]
        return [f for f in listed if _visible(f, path)]
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    if any(n.startswith(TX_PREFIX) for n in names):
        raise DataError(
            f"{uri} holds files of a dcml write that was never committed (a {TX_PREFIX}* folder "
            f"and no {MANIFEST}); rerun the command that writes it, or `dcml gc`"
        )
    return [p for p in fs.find(path) if _visible(p, path)]


def in_process(fs: fsspec.AbstractFileSystem) -> bool:
    """A filesystem that only this process can see (memory://): Ray workers cannot open it."""
    return "memory" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def read_file(
    fs: fsspec.AbstractFileSystem,
    path: str,
    fmt: str,
    data: bytes | None = None,
    text_columns: list[str] = (),
) -> pa.Table:
    """One raw file (or its bytes, read elsewhere) -> an Arrow table; any failure names the file.
    `text_columns`: CSV columns read as text whatever they look like (ids such as 00123)."""
    try:
        if data is None:
            with fs.open(path, "rb") as f:
                data = f.read()
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt == "csv":
            types = dict.fromkeys(text_columns, pa.string())
            return pacsv.read_csv(
                io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types)
            )
        return _read_json_lines(data)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable {fmt} file: {e}") from e


def read_schema(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> pa.Schema:
    if fmt == "parquet":
        try:
            with fs.open(path, "rb") as f:
                return pq.read_schema(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
    return read_file(fs, path, fmt).schema


def _read_json_lines(data: bytes) -> pa.Table:
    try:
        return pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid:
        # Arrow's JSON reader gives no line numbers; find the first bad line for the message.
        for n, line in enumerate(data.decode().splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {n}: {e.msg}") from e
        raise


def read_dataset(files: list[str], fmt: str, fs: fsspec.AbstractFileSystem):
    """Raw files as a Ray Dataset with Ray's own readers (batch inference: no cleaning)."""
    import pyarrow.fs as pafs
    import ray.data

    filesystem = (
        None if isinstance(fs, LocalFileSystem) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    )
    reader = {
        "parquet": ray.data.read_parquet,
        "csv": ray.data.read_csv,
        "json": ray.data.read_json,
    }
    return reader[fmt]([fs._strip_protocol(f) for f in files], filesystem=filesystem)
