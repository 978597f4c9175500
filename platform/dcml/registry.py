"""The model registry: numbered versions under models/<name>/, and aliases such as `production`.

A version number is taken by creating `models/<name>/<N>/_claim.json` exclusively, so concurrent
registrations never share one; the claimant writes `model.safetensors` there and then creates
`model.json` (model spec, features, preprocessor state, metrics, lineage, and the list of files
with their sizes and SHA-256) exclusively: a version exists only when its `model.json` does.

An alias is an append-only log, one entry file per promotion or rollback
(`models/<name>/aliases/<alias>/<seq>.json`), each created exclusively: two promotions at once
cannot both take the same place in the history, and the one that lost re-reads the alias and is
gated again against what it points at now.
"""

from __future__ import annotations

import getpass
import math
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dcml.direction import better, mode_of
from dcml.layout import CLAIM, MODEL_JSON, alias_folder, model_file, model_folder, read_weights
from dcml.storage import Commit, Storage, check_files, read_manifest, require_intact


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: str
    meta: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def who() -> str:
    """user@host, for claims and the alias history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _versions(storage: Storage, name: str) -> list[int]:
    parent = model_folder(storage, name)
    numbers = [int(e) for e in storage.ls(parent) if e.isdigit()]
    return sorted(n for n in numbers if storage.exists(f"{parent}/{n}/{MODEL_JSON}"))


def _claim(storage: Storage, name: str) -> int:
    """Take the next free version number: the first N above every numbered folder (committed or
    not) whose claim file this process creates."""
    parent = model_folder(storage, name)
    taken = max([0, *(int(e) for e in storage.ls(parent) if e.isdigit())])
    writer = uuid.uuid4().hex
    for version in range(taken + 1, taken + 1000):
        record = {"by": who(), "at": time.time(), "writer": writer}
        if storage.create_owned(f"{parent}/{version}/{CLAIM}", record):
            return version
        # another writer took this number; take the next
    raise RuntimeError(f"could not take a version number under {storage.to_uri(parent)}")


def register(
    storage: Storage, name: str, checkpoint_path: str, meta: dict[str, Any]
) -> ModelVersion:
    """Copy a checkpoint's model file into a new version with `meta` (spec, preprocessor,
    lineage)."""
    if not name or "/" in name or name.startswith((".", "_")):
        raise ValueError(f"bad model name {name!r}")
    weights = read_weights(storage, checkpoint_path, meta.get("model_spec"))
    version = _claim(storage, name)
    commit = Commit(storage, model_folder(storage, name, version), MODEL_JSON, prefix="")
    try:
        commit.put(model_file(meta.get("model_spec")), weights)
        full = {**meta, "name": name, "version": version, "created_at": time.time()}
        full = commit.commit(full)
    except BaseException:
        commit.abort()  # the number stays claimed: never given to another model
        raise
    return ModelVersion(name, version, commit.folder, full)


def get_version(storage: Storage, name: str, version: int) -> ModelVersion:
    path = model_folder(storage, name, version)
    meta = read_manifest(storage, path, MODEL_JSON)
    if meta is None:
        raise LookupError(
            f"model {name}@{version} not found; versions: {_versions(storage, name) or 'none'}"
        )
    return ModelVersion(name, version, path, meta)


def require_model(storage: Storage, mv: ModelVersion) -> None:
    """Refuse a damaged version before serving or scoring with it (DamagedError naming each
    file); model files are small, so their SHA-256 is always checked."""
    require_intact(storage, mv.path, mv.meta, f"model {mv.ref}", full=True)


def verify_version(storage: Storage, mv: ModelVersion) -> list[str]:
    """Every problem with a version's files (missing, extra, other sizes or bytes)."""
    return check_files(storage, mv.path, mv.meta, full=True, extra=True, ignore=(CLAIM, MODEL_JSON))


# ---- aliases: an append-only log per alias ----


def alias_history(storage: Storage, name: str, alias: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of the alias, oldest first."""
    folder = alias_folder(storage, name, alias)
    entries = sorted(e for e in storage.ls(folder) if e.endswith(".json") and e[:-5].isdigit())
    return [storage.read_json(f"{folder}/{e}") for e in entries]


def _stack(history: list[dict[str, Any]]) -> list[int]:
    """The alias's versions as a stack: a promotion pushes, a rollback pops."""
    stack: list[int] = []
    for entry in history:
        if entry.get("action") == "rollback":
            stack.pop()
        else:
            stack.append(entry["version"])
    return stack


def _append(storage, name, alias, history, entry) -> bool:
    """Add the alias's next history entry; False if another writer took that place first."""
    path = f"{alias_folder(storage, name, alias)}/{len(history):08d}.json"
    entry = {**entry, "at": time.time(), "by": who(), "writer": uuid.uuid4().hex}
    return storage.create_owned(path, entry)


class PromotionRefused(ValueError):
    """A promotion the gate refuses (pass force to do it anyway)."""


def test_metric(meta: dict[str, Any]) -> tuple[str, str, float | None]:
    """A version's gating metric: the test-split twin of its training metric, its mode, value."""
    train = meta.get("config", {}).get("train", {})
    name = "test_" + str(train.get("metric", "val_roc_auc")).removeprefix("val_")
    mode = train.get("mode") if train.get("mode") in ("min", "max") else mode_of(name)
    return name, mode, meta.get("metrics", {}).get(name)


def _usable(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def gate(new: ModelVersion, current: ModelVersion | None) -> None:
    """Refuse a promotion unless the new version's test metric is present, finite and no worse
    than the current version's (which must be present and finite too)."""
    metric, mode, value = test_metric(new.meta)
    if not _usable(value):
        raise PromotionRefused(
            f"{new.ref} has no usable {metric} ({value}): not promoted (force to promote anyway)"
        )
    if current is None or current.version == new.version:
        return
    old_metric, _, old = test_metric(current.meta)
    if old_metric != metric:
        raise PromotionRefused(
            f"{new.ref} is gated on {metric} but {current.ref} on {old_metric}: they cannot be "
            "compared; not promoted (force to promote anyway)"
        )
    ours, theirs = (v.meta.get("lineage", {}).get("dataset") for v in (new, current))
    note = f" (tested on different datasets: {ours} and {theirs})" if ours != theirs else ""
    if not _usable(old):
        raise PromotionRefused(
            f"{current.ref} has no usable {metric} ({old}) to compare {new.ref} with{note}: "
            "not promoted (force to promote anyway)"
        )
    if better(old, value, mode):
        raise PromotionRefused(
            f"{new.ref} has {metric} {value} but {current.ref} has {old}{note}: not promoted "
            "(force to promote anyway)"
        )


def set_alias(
    storage: Storage, name: str, alias: str, version: int, force: bool = False
) -> int | None:
    """Point `alias` at `version`; returns the version it pointed at before (None if new).

    Gated (see `gate`) unless `force`, which the history records. A promotion that loses a race
    with another is gated again against the alias's new version."""
    if not alias or alias.isdigit() or alias == "latest" or "/" in alias or alias[0] in "._":
        raise ValueError(f"bad alias {alias!r}: use a name such as 'production'")
    new = get_version(storage, name, version)  # must exist
    for _ in range(1000):
        history = alias_history(storage, name, alias)
        current = next(reversed(_stack(history)), None)
        if not force:
            gate(new, None if current is None else get_version(storage, name, current))
        entry = {"version": version, "action": "promote", "forced": force}
        if _append(storage, name, alias, history, entry):
            return current
    raise RuntimeError(f"could not update {name}@{alias}: too many concurrent changes")


def rollback(storage: Storage, name: str, alias: str) -> int:
    """Point `alias` back at the version it pointed at before its latest promotion.

    Conditional on what the alias pointed at when called: if another promotion or rollback
    moves it first, this one is not applied (two operators undoing one bad version undo it
    once)."""
    undoing = None
    for _ in range(1000):
        history = alias_history(storage, name, alias)
        stack = _stack(history)
        if undoing is not None and stack[-1:] != [undoing]:
            now = stack[-1] if stack else None
            raise RuntimeError(
                f"{name}@{alias} moved from {undoing} to {now} meanwhile; not rolled back"
            )
        if len(stack) < 2:
            raise LookupError(f"{name}@{alias} has no earlier version to roll back to")
        undoing = stack[-1]
        if _append(storage, name, alias, history, {"version": stack[-2], "action": "rollback"}):
            return stack[-2]
    raise RuntimeError(f"could not roll back {name}@{alias}: too many concurrent changes")


def aliases(storage: Storage, name: str) -> dict[str, int]:
    out = {}
    for alias in storage.ls(alias_folder(storage, name)):
        stack = _stack(alias_history(storage, name, alias))
        if stack:
            out[alias] = stack[-1]
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
    stack = _stack(alias_history(storage, name, tag))
    if not stack:
        if not _versions(storage, name):
            known = ", ".join(sorted(list_models(storage))) or "none"
            raise LookupError(
                f"no model named {name!r} in {storage.uri('models')}; models: {known}"
            )
        raise LookupError(
            f"model {name!r} has no alias {tag!r}; "
            f"aliases: {sorted(aliases(storage, name)) or 'none'}"
        )
    return get_version(storage, name, stack[-1])


def pointed_at(storage: Storage, ref: str) -> Iterator[ModelVersion]:
    """The versions `ref` has pointed at, newest first: an alias's stack (what a rollback would
    return to), a version alone, or every version for NAME / NAME@latest."""
    name, _, tag = ref.partition("@")
    if tag.isdigit():
        versions = [int(tag)]
    elif tag in ("", "latest"):
        versions = _versions(storage, name)
    else:
        versions = _stack(alias_history(storage, name, tag))
    for v in reversed(versions):
        yield get_version(storage, name, v)


def list_models(storage: Storage) -> dict[str, list[int]]:
    return {n: _versions(storage, n) for n in storage.ls(model_folder(storage))}
