"""The model registry: numbered versions under models/<name>/, and aliases such as `production`.

A version folder holds `model.safetensors` and `model.json` (model spec, features, preprocessor
state, metrics, lineage). It is written under a temporary name and renamed into place; `model.json`
is its marker. Versions are never overwritten; aliases keep their history for rollback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dcml.predictor import MODEL_JSON
from dcml.storage import Storage
from dcml.train.loop import WEIGHTS


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: str
    meta: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _versions(storage: Storage, name: str) -> list[int]:
    found = []
    for entry in storage.ls(storage.path("models", name)):
        if entry.isdigit() and storage.exists(storage.path("models", name, entry, MODEL_JSON)):
            found.append(int(entry))
    return sorted(found)


def register(
    storage: Storage, name: str, checkpoint_path: str, meta: dict[str, Any], aliases: list[str] = ()
) -> ModelVersion:
    """Copy a checkpoint's weights into a new version with `meta` (spec, preprocessor, lineage)."""
    parent = storage.path("models", name)
    storage.fs.makedirs(parent, exist_ok=True)
    tmp = storage.tmp_dir(parent)
    try:
        storage.fs.copy(f"{checkpoint_path}/{WEIGHTS}", f"{tmp}/{WEIGHTS}")
        for _ in range(100):
            # numbered folders without a marker (a crashed remote commit) still hold their number
            version = max([0, *(int(e) for e in storage.ls(parent) if e.isdigit())]) + 1
            full = {**meta, "name": name, "version": version, "created_at": time.time()}
            storage.write_json(f"{tmp}/{MODEL_JSON}", full)
            try:
                storage.commit_dir(tmp, f"{parent}/{version}")
                break
            except (FileExistsError, OSError):
                continue  # another writer took this number; take the next
        else:
            raise RuntimeError(f"could not allocate a version number under {parent}")
    except BaseException:
        storage.remove(tmp)
        raise
    mv = ModelVersion(name, version, f"{parent}/{version}", full)
    for alias in aliases:
        set_alias(storage, name, alias, version)
    return mv


def get_version(storage: Storage, name: str, version: int) -> ModelVersion:
    path = storage.path("models", name, str(version))
    if not storage.exists(f"{path}/{MODEL_JSON}"):
        raise LookupError(
            f"model {name}@{version} not found; versions: {_versions(storage, name) or 'none'}"
        )
    return ModelVersion(name, version, path, storage.read_json(f"{path}/{MODEL_JSON}"))


def _alias_path(storage: Storage, name: str, alias: str) -> str:
    return storage.path("models", name, "aliases", f"{alias}.json")


def set_alias(storage: Storage, name: str, alias: str, version: int) -> None:
    if not alias or alias.isdigit() or alias == "latest" or "/" in alias:
        raise ValueError(f"bad alias {alias!r}: use a name such as 'production'")
    get_version(storage, name, version)  # must exist
    path = _alias_path(storage, name, alias)
    history = storage.read_json(path)["history"] if storage.exists(path) else []
    storage.write_json(
        path, {"version": version, "history": [*history, {"version": version, "at": time.time()}]}
    )


def aliases(storage: Storage, name: str) -> dict[str, int]:
    folder = storage.path("models", name, "aliases")
    out = {}
    for entry in storage.ls(folder):
        if entry.endswith(".json"):
            out[entry[: -len(".json")]] = storage.read_json(f"{folder}/{entry}")["version"]
    return out


def resolve_model(storage: Storage, ref: str) -> ModelVersion:
    """'name', 'name@latest', 'name@3' or 'name@production' -> a model version."""
    name, _, tag = ref.partition("@")
    if tag.isdigit():
        return get_version(storage, name, int(tag))
    if tag in ("", "latest"):
        versions = _versions(storage, name)
        if not versions:
            raise LookupError(f"no versions of model {name!r} in {storage.uri('models')}")
        return get_version(storage, name, versions[-1])
    path = _alias_path(storage, name, tag)
    if not storage.exists(path):
        raise LookupError(
            f"model {name!r} has no alias {tag!r}; "
            f"aliases: {sorted(aliases(storage, name)) or 'none'}"
        )
    return get_version(storage, name, storage.read_json(path)["version"])


def list_models(storage: Storage) -> dict[str, list[int]]:
    return {n: _versions(storage, n) for n in storage.ls(storage.path("models"))}
