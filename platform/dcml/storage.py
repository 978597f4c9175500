"""The storage root: datasets, runs and models under one fsspec URI, with atomic commits.

A folder is committed by writing it under a temporary name and renaming it into place (one rename on
a local disk). On object stores, where a "rename" is a copy, the folder's marker file
(`_manifest.json` for datasets, `model.json` for models) is written last, and readers treat a folder
without its marker as absent: either way a crash never leaves something that looks whole.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem


class Storage:
    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.options = dict(storage_options or {})
        self.fs, path = fsspec.core.url_to_fs(root, **self.options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            path = os.path.abspath(os.path.expanduser(path))
        self.root = path.rstrip("/")

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

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        """Names of the entries directly under path; empty if it does not exist."""
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def read_json(self, path: str) -> dict[str, Any]:
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))

    def write_text(self, path: str, text: str) -> None:
        """Write so that readers see the old file or the new one, never a part."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w", encoding="utf-8") as f:  # one PUT: atomic on object stores
                f.write(text)

    def tmp_dir(self, parent: str) -> str:
        path = f"{parent}/.tmp-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(path, exist_ok=True)
        return path

    def commit_dir(self, tmp: str, final: str) -> None:
        """Move a finished temporary folder to its final name; refuses to replace anything."""
        if self.fs.exists(final):
            raise FileExistsError(f"{final} already exists; stored data is never overwritten")
        if self.is_local:
            os.rename(tmp, final)
        else:  # object stores: copy file by file (s3fs's recursive mv trips on folder keys)
            sources = self.fs.find(tmp)
            targets = [final + src[len(tmp) :] for src in sources]
            if sources:
                self.fs.copy(sources, targets)
            self.fs.rm(tmp, recursive=True)

    def commit_with_marker(self, tmp: str, final: str, marker: str, obj: Any) -> None:
        """Commit a folder whose marker file says it is complete.

        Locally the marker goes in before the one rename; on object stores, where the move is a
        copy, it is written after the move, so a half-copied folder never has one.
        """
        if self.is_local:
            self.write_json(f"{tmp}/{marker}", obj)
            self.commit_dir(tmp, final)
        else:
            self.commit_dir(tmp, final)
            self.write_json(f"{final}/{marker}", obj)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
