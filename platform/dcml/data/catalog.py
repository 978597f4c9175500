"""The dataset catalog: committed dataset versions under datasets/<name>/<version>/.

A version is its `_manifest.json` (schema, rows, shards with their sizes and SHA-256, the fitted
preprocessor, the gate's report); its shards sit under the prefix of the writer that committed it.
A folder without a manifest is not a version, and files its manifest does not list are not part
of it (another writer's, or a crashed writer's: `dcml gc` finds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dcml.data.transforms import Preprocessor
from dcml.layout import MANIFEST, dataset_folder
from dcml.storage import Storage, check_files, read_manifest, require_intact


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

    def shards(self, split: str) -> list[dict[str, Any]]:
        """The split's shards in file order (the names hold the source file and row)."""
        found = [s for s in self.manifest["shards"] if s["split"] == split]
        return sorted(found, key=lambda s: s["name"])

    def shard_paths(self, split: str) -> list[str]:
        return [f"{self.path}/{s['name']}" for s in self.shards(split)]


def find_version(storage: Storage, name: str, version: str) -> DatasetVersion | None:
    path = dataset_folder(storage, name, version)
    manifest = read_manifest(storage, path, MANIFEST)
    return None if manifest is None else DatasetVersion(name, version, path, manifest)


def list_versions(storage: Storage, name: str) -> list[DatasetVersion]:
    found = [find_version(storage, name, v) for v in storage.ls(dataset_folder(storage, name))]
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


def require_dataset(storage: Storage, dv: DatasetVersion, full: bool = False) -> None:
    """Refuse a damaged version before training on it: every shard present at its size (and,
    with `full`, its SHA-256)."""
    require_intact(storage, dv.path, dv.manifest, f"dataset {dv.ref}", full=full)


def verify_dataset(storage: Storage, dv: DatasetVersion) -> list[str]:
    """Every problem with a version's files: missing, extra, other sizes or bytes."""
    return check_files(storage, dv.path, dv.manifest, full=True, extra=True)


def read_split_numpy(
    storage: Storage, dv: DatasetVersion, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, X, y) of one split, read with plain pyarrow: for evaluation on the driver."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(
        [pq.read_table(p, filesystem=storage.fs) for p in dv.shard_paths(split)]
    )
    x = np.stack([table.column(c).to_numpy() for c in dv.manifest["features"]], axis=1)
    return table.column("id").to_numpy(), x.astype(np.float32), table.column("label").to_numpy()
