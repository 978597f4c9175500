"""The storage root, and the one commit protocol for everything dcml stores.

A stored thing (dataset version, model version, batch predictions, collected or synthetic data) is
a folder with a manifest. Its writer puts the files under a prefix no other writer uses, then
creates the manifest, which lists every file with its size and SHA-256, with an exclusive create:
`os.link` of a finished temporary file on a local disk, a conditional PUT (`If-None-Match: *`) on
S3, the same "create" mode on any other fsspec filesystem that offers it. A thing exists only when
its manifest does, and only the files its manifest lists belong to it. Nothing is ever renamed
(on object stores a rename is a copy, which a crash can leave half done) and nothing committed is
ever written again. docs/storage.md has the guarantees per backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from dcml.layout import MANIFEST

log = logging.getLogger(__name__)
TX_PREFIX = "tx-"  # a writer's own folder: tx-<UTC time>-<random>
LOCAL_TMP = ".tmp-"  # a local file being written, beside the name it will take
FORMAT = 3  # of manifests that list their files
# fsspec protocols whose `pipe_file(mode="create")` fails when the path exists: s3fs sends
# `If-None-Match: *`, gcsfs `ifGenerationMatch=0`; memory:// checks its own dict
EXCLUSIVE_CREATE = {"s3", "s3a", "gs", "gcs", "memory"}


class DamagedError(RuntimeError):
    """A committed thing whose files do not match its manifest; the message names each file."""


class Storage:
    """An fsspec URI and its options. Pickles as (URI, options), so the same handle travels to Ray
    workers, replicas and tasks."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.options = dict(storage_options or {})
        self.fs, path = fsspec.core.url_to_fs(root, **self.options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            path = os.path.abspath(os.path.expanduser(path))
        self.root = path.rstrip("/")

    def __reduce__(self):
        return (Storage, (self.uri(), self.options))

    @classmethod
    def from_config(cls, cfg) -> Storage:
        return cls(cfg.storage.root, cfg.storage.storage_options)

    def path(self, *parts: str) -> str:
        """A path inside the root, as the fsspec filesystem names it."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """A full URI (with protocol) for a path inside the root, for humans and other tools."""
        return self.to_uri(self.path(*parts))

    def to_uri(self, path: str) -> str:
        """The URI of an fsspec path on this filesystem."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def arrow_fs(self) -> pafs.FileSystem | None:
        """A pyarrow filesystem for Ray Data/Train; None for local paths (Ray's default)."""
        if self.is_local:
            return None
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # Listings go to the store every time: s3fs and gcsfs cache them per process, and other
    # writers' files appear without this process knowing.
    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        """Names of the entries directly under path; empty if it does not exist."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)

    def sizes(self, folder: str) -> dict[str, int]:
        """Every file under folder (recursively), by path relative to it: its size in bytes."""
        self.fs.invalidate_cache(folder)
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            return {}
        base = folder.rstrip("/") + "/"
        return {p[len(base) :]: int(i["size"]) for p, i in found.items() if p.startswith(base)}

    def read_bytes(self, path: str) -> bytes:
        self.fs.invalidate_cache(path)  # another process may have written it since we listed
        with self.fs.open(path, "rb") as f:
            return f.read()

    def read_json(self, path: str) -> dict[str, Any]:
        data = self.read_bytes(path)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedError(f"{self.to_uri(path)} is not valid JSON ({e})") from None

    def write_bytes(self, path: str, data: bytes) -> None:
        """A plain write, for files under a prefix that only this writer uses."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_text(path, to_json(obj))

    def write_text(self, path: str, text: str) -> None:
        """Replace a file so that readers see the old one or the new one, never a part: for a
        run's own derived outputs (report, history), which only that run writes."""
        data = text.encode()
        if self.is_local:
            tmp = self._local_tmp(path, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores

    def create(self, path: str, data: bytes) -> None:
        """Write a new file whole, or raise FileExistsError if the path exists: the one step of
        the protocol that two writers can race on, and exactly one wins."""
        if self.is_local:
            tmp = self._local_tmp(path, data)
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            finally:
                os.unlink(tmp)
            return
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else self.fs.protocol
        if not EXCLUSIVE_CREATE & set(protocols):  # a write that may silently overwrite
            raise NotImplementedError(
                f"{self.to_uri(path)}: dcml commits by exclusive create, which it uses on "
                f"{', '.join(sorted(EXCLUSIVE_CREATE))} only (see docs/storage.md)"
            )
        for attempt in range(5):
            try:
                self.fs.pipe_file(path, data, mode="create")
                return
            except FileExistsError:
                raise
            except OSError as e:  # S3 answers a conditional PUT racing another with 409
                if "409" not in str(e) and "Conflict" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.05 * 2**attempt)

    def create_owned(self, path: str, record: dict[str, Any]) -> bool:
        """`create` of a JSON record carrying a `writer` id of its own: True if this writer's
        record is there now, False if another writer's is. A create that failed because its own
        earlier attempt got through (a PUT resent after a lost answer, an NFS retry) counts as
        won, never as lost."""
        try:
            self.create(path, to_json(record).encode())
            return True
        except Exception as e:
            # the create may have landed even so (an answer lost after the write, a temporary
            # file that could not be removed after the link): the record there decides
            if read_json_or_none(self, path, {}).get("writer") == record["writer"]:
                return True
            if isinstance(e, FileExistsError):
                return False
            raise

    def _local_tmp(self, path: str, data: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{LOCAL_TMP}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def new_tx() -> str:
    """A writer's own prefix; the UTC time in it lets `dcml gc` tell abandoned ones by age."""
    return f"{TX_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:10]}"


def tx_age_s(name: str, now: float | None = None) -> float | None:
    """Seconds since a writer's prefix was started; None if `name` is not one."""
    if not name.startswith(TX_PREFIX):
        return None
    try:
        started = time.strptime(name[len(TX_PREFIX) :].split("-")[0], "%Y%m%dT%H%M%S")
    except ValueError:
        return None
    return (now or time.time()) - _timegm(started)


def _timegm(t: time.struct_time) -> float:
    import calendar

    return float(calendar.timegm(t))


def file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class Commit:
    """One writer of one stored thing: files under `folder/prefix/`, then the manifest.

    `prefix` is this writer's own (a new `tx-...` by default); "" for a folder the writer has
    claimed for itself (a model version number). `marker` is the manifest's file name."""

    storage: Storage
    folder: str
    marker: str = MANIFEST
    prefix: str = field(default_factory=new_tx)
    files: list[dict[str, Any]] = field(default_factory=list)
    writer: str = field(default_factory=lambda: uuid.uuid4().hex)
    committed: bool = False

    @property
    def base(self) -> str:
        """Where this writer's files go."""
        return f"{self.folder}/{self.prefix}" if self.prefix else self.folder

    def relative(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes) -> str:
        """Write one file (name relative to this writer's prefix); its full path."""
        path = f"{self.base}/{name}"
        try:
            self.storage.write_bytes(path, data)
        except BaseException:
            self.storage.remove(path)  # a torn write is not left behind
            raise
        self.files.append(file_entry(self.relative(name), data))
        return path

    def add(self, entries: list[dict[str, Any]]) -> None:
        """Files written elsewhere (Ray tasks): entries from `file_entry`, paths relative to the
        prefix."""
        self.files += [{**e, "path": self.relative(e["path"])} for e in entries]

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Create the manifest: from here on the thing exists. FileExistsError if another writer
        committed this folder first (this writer's files are then left for `abort`).

        Once committed, no other writer can ever commit this folder, so the `tx-*` prefixes of
        writers that lost or crashed are removed here: readers that list the folder themselves
        (pyarrow, Spark) then see only the committed files."""
        manifest = {
            **meta,
            "manifest_format": FORMAT,
            "prefix": self.prefix,
            "files": sorted(self.files, key=lambda e: e["path"]),
            "committed_at": time.time(),
            "writer": self.writer,
        }
        if not self.storage.create_owned(f"{self.folder}/{self.marker}", manifest):
            raise FileExistsError(f"{self.storage.to_uri(self.folder)} was committed by another")
        self.committed = True
        if self.prefix:
            self._remove_others()
        return manifest

    def _remove_others(self) -> None:
        """Best effort: the commit stands whatever happens here (another writer removing its own
        files meanwhile, a store's hiccup); `dcml gc` removes what is left."""
        try:
            entries = self.storage.ls(self.folder)
        except Exception:
            entries = []
        for entry in entries:
            if entry.startswith(TX_PREFIX) and entry != self.prefix:
                try:
                    self.storage.remove(f"{self.folder}/{entry}")
                except Exception as e:
                    log.warning("left %s (`dcml gc` removes it): %s", entry, e)

    def abort(self) -> None:
        """Remove this writer's files (never another writer's, never a manifest, nothing once
        committed: a caller that fails after the commit must not take the committed files)."""
        if self.committed:
            return
        if self.prefix:
            self.storage.remove(self.base)
        else:
            for e in self.files:
                self.storage.remove(f"{self.folder}/{e['path']}")


def lists_files(manifest: dict[str, Any]) -> bool:
    """Whether a manifest lists its files (written by this protocol, not an older dcml)."""
    return manifest.get("manifest_format", 0) >= FORMAT


def require_new_output(storage: Storage, folder: str, uri: str) -> None:
    """Refuse an output folder that holds a committed thing or anything but writers' leftovers
    (`tx-*` prefixes of a crashed earlier write, which the rerun's commit removes, and a
    manifest's temporary file that a crash left half written)."""
    if read_manifest(storage, folder) is not None:
        raise FileExistsError(f"{uri} exists; stored data is never overwritten")
    foreign = [
        e for e in storage.ls(folder) if not e.startswith((TX_PREFIX, f"{MANIFEST}{LOCAL_TMP}"))
    ]
    if foreign:
        raise FileExistsError(
            f"{uri} holds other files ({', '.join(foreign[:3])}); write to a new folder"
        )


def read_json_or_none(storage: Storage, path: str, default: Any = None) -> Any:
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        return default


def read_manifest(storage: Storage, folder: str, marker: str = MANIFEST) -> dict[str, Any] | None:
    """A committed thing's manifest, or None if the folder holds no committed thing; a manifest
    that is not valid JSON is a DamagedError naming it."""
    return read_json_or_none(storage, f"{folder}/{marker}")


def check_files(
    storage: Storage,
    folder: str,
    manifest: dict[str, Any],
    full: bool = False,
    extra: bool = False,
    ignore: tuple[str, ...] = (),
) -> list[str]:
    """What is wrong with a committed thing's files, one line per file: missing, another size,
    (`full`) other bytes, (`extra`) files in its prefix that the manifest does not list."""
    if not lists_files(manifest):
        return [f"{storage.to_uri(folder)}: stored without a file list (before dcml's manifests)"]
    found = storage.sizes(folder)
    problems = []
    for e in manifest["files"]:
        path = f"{folder}/{e['path']}"
        size = found.get(e["path"])
        if size is None:
            problems.append(f"missing: {storage.to_uri(path)}")
        elif size != e["bytes"]:
            problems.append(
                f"altered: {storage.to_uri(path)} has {size} bytes, the manifest {e['bytes']}"
            )
        elif full and hashlib.sha256(storage.read_bytes(path)).hexdigest() != e["sha256"]:
            problems.append(f"altered: {storage.to_uri(path)} (SHA-256 differs from the manifest)")
    if extra:
        listed = {e["path"] for e in manifest["files"]}
        prefix = manifest.get("prefix") or ""
        own = [p for p in found if p.startswith(f"{prefix}/")] if prefix else list(found)
        for p in sorted(own):
            name = p.rsplit("/", 1)[-1]
            if p not in listed and name not in ignore and LOCAL_TMP not in name:
                problems.append(f"extra: {storage.to_uri(f'{folder}/{p}')}")
    return problems


def require_intact(
    storage: Storage, folder: str, manifest: dict[str, Any], what: str, full: bool = False
) -> None:
    """Refuse a damaged thing before it is used: DamagedError naming each bad file. (A thing
    stored before manifests listed their files has nothing to check against.)"""
    if not lists_files(manifest):
        return
    problems = check_files(storage, folder, manifest, full=full)
    if problems:
        raise DamagedError(
            f"{what} is damaged; not using it (`dcml gc` and a rerun, or restore the files):\n  "
            + "\n  ".join(problems)
        )
