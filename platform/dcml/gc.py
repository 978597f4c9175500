"""`dcml gc`: what a storage root holds that nothing needs, and (with --yes) deleting it.

Three kinds, each only when older than the given age:
* abandoned writes, anywhere under the root: a writer's `tx-*` prefix that its folder's manifest
  does not name (a crashed or losing writer), the files of a claimed model number whose version
  was never committed, and local temporary files;
* checkpoints of finished runs and sweeps that no registered model came from (a run that has
  not finished may still be resumed, so it keeps them);
* dataset versions that no run and no model names.

Nothing a manifest lists is deleted while something references it. A dataset version is deleted
manifest first, so it stops existing before any of its files go.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from dcml.layout import (
    CLAIM,
    MANIFEST,
    MODEL_JSON,
    RUN_JSON,
    TEST_METRICS,
    dataset_folder,
    model_folder,
    run_folder,
)
from dcml.storage import LOCAL_TMP, TX_PREFIX, DamagedError, Storage, read_manifest, tx_age_s


@dataclass(frozen=True)
class Garbage:
    kind: str  # "abandoned write" | "unused checkpoint" | "unreferenced dataset"
    path: str  # fsspec path of a folder or file
    age_s: float
    manifest: str | None = None  # deleted first: a committed thing stops existing at once


def _age(storage: Storage, path: str, now: float) -> float | None:
    """Seconds since a file was last written; None if the store does not say."""
    try:
        stamp = _stamp(storage.fs.info(path))
    except FileNotFoundError:
        return None
    return None if stamp is None else now - stamp


def _stamp(info: dict[str, Any]) -> float | None:
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if stamp is None:
        return None
    return float(stamp.timestamp() if hasattr(stamp, "timestamp") else stamp)


def _abandoned(storage: Storage, now: float, min_age: float, manifest_of):
    """One listing of the whole root: every writer prefix (`tx-*`) that its folder's manifest
    does not name (a crashed or losing writer's, in any committed folder or output under the
    root), every local temporary file, and the files of model numbers claimed but never
    committed (their claim stays, so the number is never handed out again)."""
    storage.fs.invalidate_cache(storage.root)
    files = storage.fs.find(storage.root, detail=True)
    base = storage.root + "/"
    prefixes: dict[str, float] = {}
    for path, info in files.items():
        parts = path[len(base) :].split("/")
        name = parts[-1]
        tx = next((i for i, p in enumerate(parts) if p.startswith(TX_PREFIX)), None)
        if tx is not None:
            folder, prefix = base + "/".join(parts[:tx]), parts[tx]
            manifest = manifest_of(folder) or {}
            if not manifest.get("unreadable") and manifest.get("prefix") != prefix:
                prefixes[f"{folder}/{prefix}"] = tx_age_s(prefix, now) or 0.0
        elif LOCAL_TMP in name:
            stamp = _stamp(info)
            if stamp is not None and now - stamp >= min_age:
                yield Garbage("abandoned write", path, now - stamp)
        elif parts[0] == "models" and len(parts) == 4 and parts[2].isdigit() and name != CLAIM:
            folder = base + "/".join(parts[:3])
            if manifest_of(folder, MODEL_JSON) is None:
                claim = _tolerant(storage, folder, CLAIM) or {}
                age = now - claim.get("at", _stamp(info) or now)
                if age >= min_age:
                    yield Garbage("abandoned write", path, age)
    for prefix, age in sorted(prefixes.items()):
        if age >= min_age:
            yield Garbage("abandoned write", prefix, age)


def _tolerant(storage: Storage, folder: str, marker: str) -> dict[str, Any] | None:
    """A manifest or record, {} if it cannot be read (such a folder is never collected)."""
    try:
        return read_manifest(storage, folder, marker)
    except DamagedError:
        return {}


def _references(storage: Storage) -> tuple[set[str], set[str]]:
    """(dataset refs, run/sweep ids) that runs and models name."""
    datasets, runs = set(), set()
    for run_id in storage.ls(run_folder(storage)):
        record = _tolerant(storage, run_folder(storage, run_id), RUN_JSON)
        if record:
            datasets.add(record.get("dataset"))
    models = model_folder(storage)
    for name in storage.ls(models):
        for entry in storage.ls(f"{models}/{name}"):
            meta = _tolerant(storage, f"{models}/{name}/{entry}", MODEL_JSON)
            lineage: dict[str, Any] = (meta or {}).get("lineage", {})
            datasets.add(lineage.get("dataset"))
            runs.update(filter(None, (lineage.get("run_id"), lineage.get("sweep_id"))))
    return datasets, runs


FINISHED = (TEST_METRICS, "trials.parquet")  # written when a train run / a sweep has finished
CHECKPOINT = re.compile(r"checkpoint_\d+$")  # Ray's checkpoint folders (not its snapshot files)


def _runs_done(storage: Storage, runs: set[str], now: float, min_age: float):
    """Checkpoints of finished runs and sweeps that no model came from. A run that has not
    finished (still training, or waiting to be resumed) keeps all of them."""
    for run_id in storage.ls(run_folder(storage)):
        run = run_folder(storage, run_id)
        ages = [_age(storage, f"{run}/{name}", now) for name in FINISHED]
        age = max((a for a in ages if a is not None), default=None)
        if run_id in runs or age is None or age < min_age:
            continue
        for path in storage.fs.glob(f"{run}/**/checkpoint_*"):
            if CHECKPOINT.search(path) and storage.fs.isdir(path):
                yield Garbage("unused checkpoint", path, age)


def find_garbage(
    storage: Storage, min_age_s: float, now: float | None = None, problems: list | None = None
) -> list[Garbage]:
    """Everything older than `min_age_s` that nothing needs. A manifest that cannot be read is
    reported in `problems` and its folder left alone."""
    now = now or time.time()
    problems = [] if problems is None else problems

    seen: dict[tuple[str, str], dict[str, Any] | None] = {}

    def manifest_of(folder: str, marker: str = MANIFEST) -> dict[str, Any] | None:
        if (folder, marker) not in seen:
            try:
                seen[folder, marker] = read_manifest(storage, folder, marker)
            except DamagedError as e:
                problems.append(str(e))
                seen[folder, marker] = {"unreadable": True}
        return seen[folder, marker]

    found = list(_abandoned(storage, now, min_age_s, manifest_of))
    top = dataset_folder(storage)
    versions = [f"{top}/{n}/{v}" for n in storage.ls(top) for v in storage.ls(f"{top}/{n}")]
    datasets, runs = _references(storage)
    found += _runs_done(storage, runs, now, min_age_s)
    for folder in versions:
        manifest = manifest_of(folder)
        ref = "@".join(folder.rsplit("/", 2)[-2:])
        if not manifest or manifest.get("unreadable") or ref in datasets:
            continue
        age = now - manifest.get("committed_at", manifest.get("created_at", now))
        if age >= min_age_s:  # its manifest, then its own files (not a later writer's)
            own = f"{folder}/{manifest['prefix']}" if manifest.get("prefix") else folder
            found.append(Garbage("unreferenced dataset", own, age, f"{folder}/{MANIFEST}"))
    return found


def delete(storage: Storage, garbage: list[Garbage]) -> None:
    """Delete what `find_garbage` listed; dataset versions are checked once more for a run or
    model that names them (one may have started meanwhile)."""
    datasets = _references(storage)[0] if any(g.manifest for g in garbage) else set()
    for g in garbage:
        if g.manifest:
            if "@".join(g.manifest.rsplit("/", 3)[-3:-1]) in datasets:
                continue
            storage.remove(g.manifest)
        storage.remove(g.path)


def collect(storage: Storage, older_than: str, yes: bool, echo) -> list[Garbage]:
    """List what is older than `older_than` (30m, 24h, 7d) and, with `yes`, delete it."""
    problems: list[str] = []
    found = find_garbage(storage, parse_age(older_than), problems=problems)
    for problem in problems:
        echo(f"skipped (unreadable): {problem}")
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
