"""`dcml gc`: what a storage root holds that nothing needs, and (with --yes) deleting it.

Three kinds, each only when older than the given age:
* abandoned writes: a writer's `tx-*` prefix that no manifest lists (a crashed or losing writer),
  a claimed model number whose version was never committed, and local temporary files;
* checkpoints of runs and sweeps that no registered model came from;
* dataset versions that no run and no model names.

Nothing a manifest lists is deleted while something references it. A dataset version is deleted
manifest first, so it stops existing before any of its files go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dcml.layout import (
    CLAIM,
    MANIFEST,
    MODEL_JSON,
    RUN_JSON,
    dataset_folder,
    model_folder,
    run_folder,
)
from dcml.storage import LOCAL_TMP, TX_PREFIX, Storage, read_manifest, tx_age_s


@dataclass(frozen=True)
class Garbage:
    kind: str  # "abandoned write" | "unused checkpoint" | "unreferenced dataset"
    path: str  # fsspec path of a folder or file
    age_s: float
    manifest: str | None = None  # deleted first: a committed thing stops existing at once


def _age(storage: Storage, path: str, now: float) -> float | None:
    """Seconds since a file was last written; None if the store does not say."""
    try:
        info = storage.fs.info(path)
    except FileNotFoundError:
        return None
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if stamp is None:
        return None
    if hasattr(stamp, "timestamp"):
        stamp = stamp.timestamp()
    return now - float(stamp)


def _abandoned_in(storage: Storage, folder: str, keep: str | None, now: float, min_age: float):
    """Writer prefixes and local temporary files in a committed-thing folder, except `keep`."""
    for entry in storage.ls(folder):
        path = f"{folder}/{entry}"
        if entry.startswith(TX_PREFIX) and entry != keep:
            age = tx_age_s(entry, now)
        elif LOCAL_TMP in entry:
            age = _age(storage, path, now)
        else:
            continue
        if age is not None and age >= min_age:
            yield Garbage("abandoned write", path, age)


def _model_debris(storage: Storage, now: float, min_age: float):
    models = model_folder(storage)
    for name in storage.ls(models):
        for entry in storage.ls(f"{models}/{name}"):
            folder = f"{models}/{name}/{entry}"
            committed = entry.isdigit() and read_manifest(storage, folder, MODEL_JSON) is not None
            if committed:  # only a local temporary file can be left in it
                yield from _abandoned_in(storage, folder, None, now, min_age)
            elif entry.isdigit():
                # a registration that never committed: its files go, its claim stays, so the
                # number is never handed out again (a slow writer may still hold it)
                claim = read_manifest(storage, folder, CLAIM)
                age = now - claim["at"] if claim else _age(storage, folder, now)
                if age is not None and age >= min_age:
                    for left in storage.ls(folder):
                        if left != CLAIM:
                            yield Garbage("abandoned write", f"{folder}/{left}", age)
            elif entry == "aliases":
                for alias in storage.ls(f"{folder}"):
                    yield from _abandoned_in(storage, f"{folder}/{alias}", None, now, min_age)


def _references(storage: Storage) -> tuple[set[str], set[str], list[str]]:
    """(dataset refs, run/sweep ids, checkpoint paths) that runs and models name."""
    datasets, runs, checkpoints = set(), set(), []
    for run_id in storage.ls(run_folder(storage)):
        record = read_manifest(storage, run_folder(storage, run_id), RUN_JSON)
        if record:
            datasets.add(record.get("dataset"))
    models = model_folder(storage)
    for name in storage.ls(models):
        for entry in storage.ls(f"{models}/{name}"):
            meta = read_manifest(storage, f"{models}/{name}/{entry}", MODEL_JSON)
            lineage: dict[str, Any] = (meta or {}).get("lineage", {})
            datasets.add(lineage.get("dataset"))
            runs.update(filter(None, (lineage.get("run_id"), lineage.get("sweep_id"))))
            if lineage.get("checkpoint"):
                checkpoints.append(lineage["checkpoint"])
    return datasets, runs, checkpoints


def find_garbage(storage: Storage, min_age_s: float, now: float | None = None) -> list[Garbage]:
    now = now or time.time()
    found = list(_model_debris(storage, now, min_age_s))
    for area in ("datasets", "raw"):
        top = storage.path(area)
        folders = [f"{top}/{n}" for n in storage.ls(top)]
        if area == "datasets":
            folders = [f"{d}/{v}" for d in folders for v in storage.ls(d)]
        for folder in folders:
            manifest = read_manifest(storage, folder, MANIFEST)
            keep = manifest.get("prefix") if manifest else None
            found += _abandoned_in(storage, folder, keep, now, min_age_s)

    datasets, runs, checkpoints = _references(storage)
    for run_id in storage.ls(run_folder(storage)):
        run = run_folder(storage, run_id)
        record = read_manifest(storage, run, RUN_JSON)
        if record is None or "created_at" not in record or run_id in runs:
            continue  # unknown age, or a model came from it
        age = now - record["created_at"]
        if age < min_age_s:
            continue
        for path in storage.fs.glob(f"{run}/**/checkpoint_*"):
            if not any(c == path or c.startswith(f"{path}/") for c in checkpoints):
                found.append(Garbage("unused checkpoint", path, age))
    top = dataset_folder(storage)
    for name in storage.ls(top):
        for version in storage.ls(f"{top}/{name}"):
            manifest = read_manifest(storage, f"{top}/{name}/{version}", MANIFEST)
            if manifest is None or f"{name}@{version}" in datasets:
                continue
            age = now - manifest.get("committed_at", manifest.get("created_at", now))
            if age >= min_age_s:
                folder = f"{top}/{name}/{version}"
                found.append(Garbage("unreferenced dataset", folder, age, f"{folder}/{MANIFEST}"))
    return found


def delete(storage: Storage, garbage: list[Garbage]) -> None:
    for g in garbage:
        if g.manifest:
            storage.remove(g.manifest)
        storage.remove(g.path)


def collect(storage: Storage, older_than: str, yes: bool, echo) -> list[Garbage]:
    """List what is older than `older_than` (30m, 24h, 7d) and, with `yes`, delete it."""
    found = find_garbage(storage, parse_age(older_than))
    for g in found:
        echo(f"{g.kind:<22}{g.age_s / 3600:>8.1f} h  {storage.to_uri(g.path)}")
    if not found:
        echo(f"nothing to collect under {storage.uri()} (older than {older_than})")
    elif yes:
        delete(storage, found)
        echo(f"deleted {len(found)} item(s)")
    else:
        echo(f"{len(found)} item(s); run again with --yes to delete them")
    return found


def parse_age(text: str) -> float:
    """'30m', '24h', '7d', '0' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(
            f"--older-than {text!r}: use a number with s, m, h or d (e.g. 24h)"
        ) from None
