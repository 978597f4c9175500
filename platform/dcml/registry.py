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
    storage: Storage, name: str, checkpoint_path: str, meta: dict[str, Any]
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
    return ModelVersion(name, version, f"{parent}/{version}", full)


def get_version(storage: Storage, name: str, version: int) -> ModelVersion:
    path = storage.path("models", name, str(version))
    if not storage.exists(f"{path}/{MODEL_JSON}"):
        raise LookupError(
            f"model {name}@{version} not found; versions: {_versions(storage, name) or 'none'}"
        )
    return ModelVersion(name, version, path, storage.read_json(f"{path}/{MODEL_JSON}"))


def _alias_path(storage: Storage, name: str, alias: str) -> str:
    return storage.path("models", name, "aliases", f"{alias}.json")


class PromotionRefused(ValueError):
    """A promotion that would make an alias's test metric worse (pass force to do it anyway)."""


def test_metric(meta: dict[str, Any]) -> tuple[str, str, float | None]:
    """A version's gating metric: the test-split twin of its training metric, its mode, value."""
    train = meta.get("config", {}).get("train", {})
    name = "test_" + str(train.get("metric", "val_roc_auc")).removeprefix("val_")
    return name, train.get("mode", "max"), meta.get("metrics", {}).get(name)


def alias_history(storage: Storage, name: str, alias: str) -> list[dict[str, Any]]:
    path = _alias_path(storage, name, alias)
    return storage.read_json(path)["history"] if storage.exists(path) else []


def _stack(history: list[dict[str, Any]]) -> list[int]:
    """The alias's versions as a stack: a promotion pushes, a rollback pops."""
    stack: list[int] = []
    for entry in history:
        if entry.get("action") == "rollback":
            stack.pop()
        else:
            stack.append(entry["version"])
    return stack


def _write_alias(storage, name, alias, version, history, action) -> None:
    entry = {"version": version, "action": action, "at": time.time()}
    storage.write_json(
        _alias_path(storage, name, alias), {"version": version, "history": [*history, entry]}
    )


def set_alias(
    storage: Storage, name: str, alias: str, version: int, force: bool = False
) -> int | None:
    """Point `alias` at `version`; returns the version it pointed at before (None if new).

    Gated: a version whose test metric is worse than the alias's current version's is refused
    (PromotionRefused) unless `force`."""
    if not alias or alias.isdigit() or alias == "latest" or "/" in alias:
        raise ValueError(f"bad alias {alias!r}: use a name such as 'production'")
    new = get_version(storage, name, version)  # must exist
    history = alias_history(storage, name, alias)
    current = next(reversed(_stack(history)), None)
    if current is not None and current != version and not force:
        metric, mode, old_value = test_metric(get_version(storage, name, current).meta)
        value = new.meta.get("metrics", {}).get(metric)
        worse = old_value is not None and (
            value is None or (value < old_value if mode == "max" else value > old_value)
        )
        if worse:
            raise PromotionRefused(
                f"{name}@{version} has {metric} {value} but {name}@{alias} (version {current}) "
                f"has {old_value}: not promoted (force to promote anyway)"
            )
    _write_alias(storage, name, alias, version, history, "promote")
    return current


def rollback(storage: Storage, name: str, alias: str) -> int:
    """Point `alias` back at the version it pointed at before its latest promotion."""
    history = alias_history(storage, name, alias)
    stack = _stack(history)
    if len(stack) < 2:
        raise LookupError(f"{name}@{alias} has no earlier version to roll back to")
    _write_alias(storage, name, alias, stack[-2], history, "rollback")
    return stack[-2]


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
