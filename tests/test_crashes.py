"""Crashes and failing storage: no partial thing is ever listed or loadable, and a rerun commits.

- test_a_storage_failing_on_each_write_leaves_nothing_partial: a filesystem that fails its k-th
  write, for every k a registration, a dataset version, predictions and collected raw data make;
- test_a_manifest_create_whose_reply_is_lost: the manifest's create lands but its writer hears
  of a failure (FileExistsError, or another OSError): the writer reads its manifest back;
- test_a_killed_writers_temporary_file_is_not_damage: what a writer killed inside
  Storage.create leaves beside a committed version (found by the kill test);
- test_writers_killed_at_random_points_leave_nothing_partial: writers of model versions,
  dataset versions and predictions, SIGKILLed at random moments, on the local disk and on S3.

Each failure is followed by the same checks (`Checks`): every listed model version loads with
`Predictor.from_storage` and `registry.verify_version` finds nothing wrong, `@latest` resolves to
the newest and loads, aliases point at listed versions; every listed dataset version passes
`catalog.verify_dataset`; every prediction output is either committed (its files intact, and
reading the folder finds exactly its manifest's files and rows) or refused by
`sources.resolve_files`; a version number is never shared (a registration's number holds its own
registration's weights and metadata, and a number claimed by a writer that died is never anyone
else's version); and a rerun commits.

Each test ends with `dcml gc` on its storage root: it finds every piece of debris the failures left
(`debris`), and deleting what it finds leaves everything committed whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from fsspec.implementations.memory import MemoryFileSystem

from dcml import registry
from dcml.config import parse_config
from dcml.data.catalog import (
    dataset_folder,
    find_version,
    list_versions,
    resolve_dataset,
    verify_dataset,
)
from dcml.data.errors import DataError
from dcml.data.sources import collect_bundled, resolve_files
from dcml.data.transforms import Preprocessor
from dcml.predictor import MODEL_JSON, Predictor
from dcml.storage import MANIFEST, TX_PREFIX, Storage, check_files, read_manifest

from .conftest import MOTO_ONE_AT_A_TIME, free_port, register_tiny_model, tiny_categorical_model
from .crash_writer import (
    RawInput,
    input_batches,
    parquet_bytes,
    register_one,
    write_dataset_version,
    write_predictions,
)

WRITER = Path(__file__).with_name("crash_writer.py")
BUCKET = "dcml-crash"
DATASET = "crash"
# Kill rounds per storage; each kills 4 writers: 2 registering, 1 preprocess, 1 predict. A round
# on S3 costs about 2.5 s of CPU here (each writer's S3 client alone takes 0.3 s to make, and moto
# serves every request in Python): 5 rounds there keep the module within its time.
ROUNDS = {"local": 10, "s3": 5}
SERIAL = itertools.count()


# ---- inputs --------------------------------------------------------------------------------


def raw_tables(rows: int = 120, files: int = 2) -> list[pa.Table]:
    rng = np.random.default_rng(7)
    f1, f2 = rng.normal(size=rows), rng.normal(size=rows)
    label = ((f1 + f2) > 0).astype(np.int64)
    table = pa.table({"id": np.arange(rows), "f1": f1, "f2": f2, "label": label})
    return [table.slice(i * rows // files, rows // files) for i in range(files)]


def transforms() -> Preprocessor:
    """Stands for the fitted transforms in the writers' dataset versions (no Ray to fit them)."""
    cols = ["f1", "f2"]
    return Preprocessor(
        numeric=cols,
        categorical=[],
        fill=dict.fromkeys(cols, 0.0),
        clip={},
        center=dict.fromkeys(cols, 0.0),
        scale=dict.fromkeys(cols, 1.0),
        categories={},
    )


def model_meta(folder: Path) -> dict:
    """The tiny model's metadata, with the data config that batch prediction reads."""
    folder.mkdir()
    return {**tiny_categorical_model(folder), "config": {"data": {"id_column": "id"}}}


# ---- the checks ----------------------------------------------------------------------------


@dataclass
class Checks:
    """What every failure is followed by. Versions verified once are checked again by size (one
    listing per model or dataset) after later failures, and in full at the end (`full=True`)."""

    storage: Storage
    options: dict
    models: dict = field(default_factory=dict)  # (name, version) -> model.json as verified
    tokens: dict = field(default_factory=dict)  # registration token -> (name, version)
    abandoned: set = field(default_factory=set)  # (name, number): claimed, never committed
    datasets: dict = field(default_factory=dict)  # (name, version) -> manifest
    outputs: dict = field(default_factory=dict)  # output URI -> manifest, or None: uncommitted

    def all(self, full: bool = False, outputs: list[str] = (), latest: bool = True) -> None:
        """Everything listed; `outputs`; `latest`: that name@latest resolves to the newest
        version and loads (a listing of its own: the kill test on S3 leaves it to the end)."""
        # As a new process would: s3fs keeps this process's listings (of folders the checks
        # listed before the writers committed them), and Storage.read_bytes consults them.
        self.storage.fs.invalidate_cache()
        self.check_models(full, latest or full)
        for name in self.storage.ls(self.storage.path("datasets")):
            self.check_datasets(name, full, latest or full)
        listings: dict[str, dict] = {}
        for uri in outputs:
            known = self.outputs.get(uri)
            if known is None or full:
                self.check_output(uri, full)
                continue
            out = Storage(uri, self.options)  # committed before: still all there
            parent, name = out.root.rsplit("/", 1)
            if parent not in listings:
                listings[parent] = out.sizes(parent)
            for path in [MANIFEST, *(e["path"] for e in known["files"])]:
                assert f"{name}/{path}" in listings[parent], (uri, path)

    def check_models(self, full: bool = False, latest: bool = True) -> None:
        s = self.storage
        for name, versions in registry.list_models(s).items():
            assert versions == sorted(set(versions))
            sizes = s.sizes(s.path("models", name))
            for v in versions:
                known = self.models.get((name, v))
                if known is not None and not full:  # verified before: still all there
                    for e in known["files"]:
                        assert sizes.get(f"{v}/{e['path']}") == e["bytes"], (name, v, e)
                    continue
                mv = registry.get_version(s, name, v)
                assert (mv.meta["name"], mv.meta["version"]) == (name, v)
                assert known is None or known == mv.meta  # a committed model.json never changes
                assert registry.verify_version(s, mv) == [], mv.ref
                Predictor.from_storage(s, mv.path)
                token = mv.meta.get("lineage", {}).get("token")
                if token is not None:  # one registration, one version
                    assert self.tokens.setdefault(token, (name, v)) == (name, v), token
                self.models[(name, v)] = mv.meta
            if versions and latest:
                newest = registry.resolve_model(s, f"{name}@latest")
                assert newest.version == versions[-1]
                Predictor.from_storage(s, newest.path)
            for alias, v in registry.aliases(s, name).items():
                assert v in versions, (name, alias, v)
            # numbers claimed but never committed: not versions, never another writer's
            numbered = {int(e) for e in s.ls(s.path("models", name)) if e.isdigit()}
            for n in sorted(numbered - set(versions)):
                if (name, n) not in self.abandoned:  # what get_version reads, and the loader
                    folder = s.path("models", name, str(n))
                    assert read_manifest(s, folder, MODEL_JSON) is None
                    with pytest.raises(FileNotFoundError):
                        Predictor.from_storage(s, folder)
                    self.abandoned.add((name, n))
            assert not {n for m, n in self.abandoned if m == name} & set(versions)

    def check_datasets(self, name: str, full: bool = False, latest: bool = True) -> None:
        s = self.storage
        versions = list_versions(s, name)
        sizes = s.sizes(s.path("datasets", name))
        for dv in versions:
            assert dv.manifest["version"] == dv.version
            known = self.datasets.get((name, dv.version))
            if known is not None and not full:
                assert known == dv.manifest
                for e in known["files"]:
                    assert sizes.get(f"{dv.version}/{e['path']}") == e["bytes"], (dv.ref, e)
                continue
            assert verify_dataset(s, dv) == [], dv.ref
            self.datasets[(name, dv.version)] = dv.manifest
        if versions and latest:
            assert resolve_dataset(s, f"{name}@latest").version == versions[-1].version

    def check_output(self, uri: str, full: bool = False) -> bool:
        """A folder a writer commits (predictions, collected raw data): committed and intact,
        or refused by readers. True if committed."""
        out = Storage(uri, self.options)
        out.fs.invalidate_cache()  # see `all`
        manifest = read_manifest(out, out.root)
        if manifest is None:
            assert self.outputs.get(uri) is None  # committed outputs never go away
            with pytest.raises(DataError):  # a write that never committed: no data to read
                resolve_files(uri, "parquet", self.options)
            self.outputs[uri] = None
            return False
        if self.outputs.get(uri) == manifest and not full:
            return True
        assert check_files(out, out.root, manifest, full=True, extra=True) == [], uri
        fs, files, _ = resolve_files(uri, "parquet", self.options)
        listed = [out.to_uri(f"{out.root}/{e['path']}") for e in manifest["files"]]
        assert files == sorted(listed)
        if "rows" in manifest:
            rows = 0
            for f in files:
                with fs.open(f, "rb") as fh:
                    rows += pq.read_metadata(fh).num_rows
            assert rows == manifest["rows"]
        self.outputs[uri] = manifest
        return True


def collect_debris(storage: Storage, checks, outputs: list[str]) -> int:
    """`dcml gc` finds everything the failures left (a claim is kept on purpose: the number is
    never handed out again), deletes it with --yes, and everything committed is still whole."""
    from dcml import gc

    left = [p for p in debris(storage) if not p.endswith("/_claim.json")]
    found = [storage.path(g.path[len(storage.root) + 1 :]) for g in gc.find_garbage(storage, 0)]
    missed = [p for p in left if not any(storage.path(p).startswith(f) for f in found)]
    assert not missed, missed
    gc.delete(storage, [g for g in gc.find_garbage(storage, 0) if g.kind == "abandoned write"])
    assert [p for p in debris(storage) if not p.endswith("/_claim.json")] == []
    checks.all(full=True, outputs=outputs)
    return len(left)


def debris(storage: Storage) -> list[str]:
    """What failed writers left (for `dcml gc`): files under a writer prefix that no manifest
    names, files of claimed model numbers without model.json, local temporary files."""
    files = storage.sizes(storage.root)
    manifests: dict[str, dict | None] = {}

    def committed_prefix(folder: str, prefix: str) -> bool:
        if folder not in manifests:
            manifests[folder] = read_manifest(storage, storage.path(folder))
        return (manifests[folder] or {}).get("prefix") == prefix

    found = []
    for path in files:
        parts = path.split("/")
        tx = [i for i, p in enumerate(parts) if p.startswith(TX_PREFIX)]
        if ".tmp-" in parts[-1]:
            found.append(path)
        elif tx and not committed_prefix("/".join(parts[: tx[0]]), parts[tx[0]]):
            found.append(path)
        elif parts[0] == "models" and len(parts) == 4 and parts[2].isdigit():
            if "/".join([*parts[:3], MODEL_JSON]) not in files:
                found.append(path)
    return sorted(found)


# ---- a storage that fails on the k-th write --------------------------------------------------


class FailingFS(MemoryFileSystem):
    """An in-memory filesystem whose `fail_at`-th write fails (counting `open` for writing and
    `pipe_file`, the calls dcml's Storage writes with on any store but the local disk):

    - "before": OSError before anything is written;
    - "torn": a streamed write stores half its bytes, then OSError (a disk that filled up); a
      `pipe_file` (one PUT on S3, atomic) fails as "before";
    - "landed": the write lands whole and its caller gets OSError (a reply lost on the way);
    - "exists": the write lands and its caller gets FileExistsError: what s3fs raises when it
      retries a conditional PUT whose first try landed (412 If-None-Match)."""

    # a memory filesystem (its exclusive create is memory://'s), under a name of its own
    protocol = ("dcmlfail", "memory")
    store: dict = {}  # this class's own, apart from memory://'s
    pseudo_dirs = [""]
    writes = 0
    streamed: list[bool] = []  # per write since reset: an open for writing (not a pipe_file)
    fail_at: int | None = None
    how = "before"

    @classmethod
    def reset(cls, fail_at: int | None = None, how: str = "before") -> None:
        cls.writes, cls.streamed, cls.fail_at, cls.how = 0, [], fail_at, how

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("dcmlfail://"))

    def _failure(self, path: str, streamed: bool) -> str | None:
        FailingFS.writes += 1
        FailingFS.streamed.append(streamed)
        return FailingFS.how if FailingFS.writes == FailingFS.fail_at else None

    def _error(self, path: str, what: str) -> OSError:
        if FailingFS.how == "exists":
            return FileExistsError(errno.EEXIST, f"injected: write {FailingFS.writes} {what}", path)
        return OSError(errno.EIO, f"injected: write {FailingFS.writes} {what}", path)

    def _open(self, path, mode="rb", **kwargs):
        if mode in ("wb", "xb") and kwargs.get("data") is None:  # pipe_file counts its own
            how = self._failure(path, True)
            if how == "before":
                raise self._error(path, "failed before it began")
            f = super()._open(path, mode, **kwargs)
            return f if how is None else _FailingFile(f, self, path, how)
        return super()._open(path, mode, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        how = self._failure(path, False)
        if how in ("before", "torn"):
            raise self._error(path, "failed before it began")
        super().pipe_file(path, value, mode=mode, **kwargs)
        if how is not None:
            raise self._error(path, "landed, but its reply was lost")


class _FailingFile:
    def __init__(self, f, fs: FailingFS, path: str, how: str):
        self.f, self.fs, self.path, self.how = f, fs, path, how

    def write(self, data: bytes) -> int:
        if self.how == "torn":
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "injected: no space left after half the bytes", self.path)
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if exc[0] is None:  # landed whole: the caller hears of a failure all the same
            raise self.fs._error(self.path, "landed, but its reply was lost")


@pytest.fixture
def failing(tmp_path):
    fsspec.register_implementation("dcmlfail", FailingFS, clobber=True)
    FailingFS.store.clear()
    FailingFS.pseudo_dirs[:] = [""]
    FailingFS.reset()
    storage = Storage("dcmlfail:///store")
    register_tiny_model(storage, tmp_path / "tiny")
    meta = model_meta(tmp_path / "meta")
    model = registry.register(storage, "scorer", storage.path("checkpoints", "tiny"), meta)
    for i, t in enumerate(raw_tables()):
        storage.write_bytes(storage.path("raw-in", f"part-{i}.parquet"), parquet_bytes(t))
    for i, t in enumerate(input_batches(3, 4)):
        storage.write_bytes(storage.path("pred-in", f"part-{i}.parquet"), parquet_bytes(t))
    cfg = parse_config(
        {
            "storage": {"root": storage.uri()},
            "data": {"name": DATASET, "source": storage.uri("raw-in")},
        }
    )
    yield storage, meta, model, cfg
    FailingFS.reset()
    FailingFS.store.clear()


def thing_writers(storage: Storage, meta: dict, model, cfg) -> dict:
    """Per kind of thing: `write(n, rerun)`, which writes the n-th one (a rerun writes the same
    folder again; a registration's rerun is a new registration), and `committed(n, rerun)`."""
    checkpoint = storage.path("checkpoints", "tiny")
    raw = RawInput(cfg, storage)
    pre = transforms()

    def register(n: int, rerun: bool) -> None:
        mv = register_one(storage, "m", checkpoint, meta, f"t{n}{'r' * rerun}")
        registry.set_alias(storage, "m", "production", mv.version, force=True)

    def registered(n: int, rerun: bool) -> bool:
        versions = registry.list_models(storage).get("m", [])
        tokens = [registry.get_version(storage, "m", v).meta["lineage"]["token"] for v in versions]
        return f"t{n}{'r' * rerun}" in tokens

    def dataset(n: int, rerun: bool) -> None:
        write_dataset_version(cfg.model_copy(update={"seed": n}), storage, raw, f"v{n:03d}", pre)

    def predictions(n: int, rerun: bool) -> None:
        write_predictions(
            storage, model.ref, storage.uri("pred-in"), storage.uri("preds", f"{n:03d}")
        )

    def bundled(n: int, rerun: bool) -> None:
        collect_bundled(Storage(storage.uri("bundled", f"{n:03d}")), "breast_cancer", 1)

    def has_manifest(parts):
        return lambda n, rerun: read_manifest(storage, storage.path(*parts(n))) is not None

    return {
        "register": (register, registered),
        "dataset": (
            dataset,
            lambda n, rerun: find_version(storage, DATASET, f"v{n:03d}") is not None,
        ),
        "predictions": (predictions, has_manifest(lambda n: ("preds", f"{n:03d}"))),
        "bundled": (
            bundled,
            has_manifest(lambda n: ("bundled", f"{n:03d}", "raw", "breast_cancer")),
        ),
    }


def output_uris(storage: Storage) -> list[str]:
    """The prediction outputs and collected raw data under the root: what readers open."""
    return [storage.uri("preds", n) for n in storage.ls(storage.path("preds"))] + [
        storage.uri("bundled", n, "raw", "breast_cancer")
        for n in storage.ls(storage.path("bundled"))
    ]


def test_a_storage_failing_on_each_write_leaves_nothing_partial(failing):
    """For each thing (a registration and a forced promotion of it; a dataset version through
    `ShardTask` and `Commit`; predictions through `predict_batch`; `collect_bundled`
    with 1 shard) and each k from 1 to the number of writes it makes, the k-th write fails
    before it begins, or (a streamed write) after half its bytes: the writer raises that error,
    nothing partial is listed or loadable, and a rerun commits."""
    storage, meta, model, cfg = failing
    checks = Checks(storage, {})
    n = cases = 0
    for kind, (write, committed) in thing_writers(storage, meta, model, cfg).items():
        n += 1
        FailingFS.reset()
        write(n, False)
        total, streamed = FailingFS.writes, FailingFS.streamed  # the writes one makes
        assert total >= 2 and committed(n, False), kind
        for k in range(1, total + 1):
            for how in ("before", "torn") if streamed[k - 1] else ("before",):
                n += 1
                FailingFS.reset(k, how)
                with pytest.raises(OSError, match="injected"):
                    write(n, False)
                FailingFS.reset()
                checks.all(outputs=output_uris(storage))
                # only the promotion, after the version's commit, fails with the version listed
                assert committed(n, False) == (kind == "register" and k == total), (kind, k, how)
                write(n, True)
                assert committed(n, True), (kind, k, how)
                checks.all(outputs=output_uris(storage))
                cases += 1
    checks.all(full=True, outputs=output_uris(storage))
    left = collect_debris(storage, checks, output_uris(storage))
    print(f"\n{cases} failures injected; gc found and removed {left} debris files")


@pytest.mark.parametrize(
    "kind, how",
    [
        (kind, how)
        for kind in ("register", "dataset", "predictions", "bundled")
        for how in ("exists", "landed")
    ],
)
def test_a_manifest_create_whose_reply_is_lost(failing, kind, how):
    """The manifest's create (model.json for a registration) lands, but the writer hears of a
    failure: an OSError, or the FileExistsError that s3fs raises when it retries a conditional
    PUT whose first try landed (412 If-None-Match). Whatever the writer does then, what is
    listed must be whole: committed with every file, or not listed."""
    storage, meta, model, cfg = failing
    write, committed = thing_writers(storage, meta, model, cfg)[kind]
    FailingFS.reset()
    write(1, False)
    manifest_write = FailingFS.writes - (kind == "register")  # the promotion comes after it
    FailingFS.reset(manifest_write, how)
    with contextlib.suppress(OSError):
        write(2, False)
    FailingFS.reset()
    assert committed(2, False)  # it landed
    Checks(storage, {}).all(full=True, outputs=output_uris(storage))


def test_a_killed_writers_temporary_file_is_not_damage(tmp_path):
    """On the local disk Storage.create writes `<name>.tmp-<uuid>` and links it to `<name>`. A
    writer killed after writing it and before unlinking it leaves it: the winner of a version
    number's claim can find a loser's `_claim.json.tmp-...` in its folder, and a writer killed
    right after linking its model.json leaves `model.json.tmp-...` beside it (the kill test
    met the first). The version is whole: verifying it must find nothing wrong."""
    storage = Storage(str(tmp_path / "store"))
    mv = registry.resolve_model(storage, register_tiny_model(storage, tmp_path / "tiny"))
    for name in ("_claim.json", MODEL_JSON):
        Path(mv.path, f"{name}.tmp-{'0' * 32}").write_bytes(Path(mv.path, name).read_bytes())
    Predictor.from_storage(storage, mv.path)  # it loads
    assert registry.verify_version(storage, mv) == []


# ---- the fork server of writers, and the S3 server ----------------------------------------


class Writers:
    """tests/crash_writer.py as a fork server: one writer process per `start`, forked from a
    process that imported dcml once. Every process here is this test's own."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),
            text=True,
            start_new_session=True,
        )
        self.ready = False

    def ask(self, **cmd) -> dict:
        if not self.ready:
            assert "ready" in self._read()
            self.ready = True
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the writer server died: {self.log.read_text()[-3000:]}"
        return json.loads(line)

    def close(self) -> None:
        try:
            if not self.ready:  # still importing: it has started no writer
                raise OSError
            self.proc.stdin.close()  # it kills and reaps the writers still running
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: only ours
            self.proc.wait()


class S3Server:
    """An S3 API server on loopback (see MOTO_ONE_AT_A_TIME), started at once; `options()`
    waits until it answers and creates the buckets. Its process is this test's own."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOTO_ONE_AT_A_TIME, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._options: dict | None = None

    def options(self) -> dict:
        if self._options is None:
            url = f"http://127.0.0.1:{self.port}"
            for _ in range(600):  # a minute at most
                try:
                    requests.get(url, timeout=1)
                    break
                except requests.ConnectionError:
                    assert self.proc.poll() is None, "the S3 server exited"
                    time.sleep(0.1)
            options = {"key": "testing", "secret": "testing", "endpoint_url": url}
            fs = Storage(f"s3://{BUCKET}", options).fs
            for bucket in (BUCKET, f"{BUCKET}-raw", f"{BUCKET}-warm", f"{BUCKET}-pred"):
                fs.mkdir(bucket)
            self._options = options
        return self._options

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def servers(request, tmp_path_factory):
    """The writers' fork server and the S3 server, started before this module's first test
    (each takes seconds to start) if the kill test is to run."""
    kills = [
        item
        for item in request.session.items
        if getattr(item, "originalname", "")
        == "test_writers_killed_at_random_points_leave_nothing_partial"
    ]
    writers = Writers(tmp_path_factory.mktemp("writers") / "server.log") if kills else None
    on_s3 = any(item.callspec.params.get("backend") == "s3" for item in kills)
    s3 = S3Server() if on_s3 else None
    try:
        yield writers, s3
    finally:
        if writers is not None:
            writers.close()
        if s3 is not None:
            s3.close()


# ---- kills ---------------------------------------------------------------------------------


@dataclass
class Killed:
    kind: str
    pid: int
    markers: Path
    lines: list = field(default_factory=list)

    @property
    def committed(self) -> list[list[str]]:
        return [ln for ln in self.lines if ln[0] == "E"]

    @property
    def in_progress(self) -> list[str] | None:
        """The B line of the thing being written when the kill came, if any."""
        last = self.lines[-1]
        return last if last[0] == "B" else None


def markers(path: Path) -> list[list[str]]:
    try:
        return [ln.split(" ") for ln in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def kill_round(writers: Writers, rng, cmds: list[dict], folder: Path) -> list:
    """Start one writer per command, each with a killer that sends it SIGKILL at a random moment
    once it is ready: after 0 to 1.5 times as long as a warm thing took it, so that most kills
    fall anywhere in its first thing (a rerun of the one the last round's writer was killed
    in), the others in its second. Wait until all are dead."""
    started = []
    for cmd in cmds:
        path = folder / f"{next(SERIAL)}-{cmd['kind']}"
        at = rng.uniform(0, 1.5)
        pid = writers.ask(op="start", markers=str(path), kill_at=at, **cmd)["pid"]
        started.append(Killed(cmd["kind"], pid, path))
    for w in started:
        status = writers.ask(op="wait", pid=w.pid)
        w.lines = markers(w.markers)
        errors = [" ".join(ln) for ln in w.lines if ln[0] == "X"]
        assert not errors, f"{w.kind} writer failed on its own: {errors}"
        assert status["signal"] == signal.SIGKILL, (w.kind, status)
        assert [ln[0] for ln in w.lines[:2]] == ["S", "R"]
        w.lines = w.lines[1:]
    return started


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_writers_killed_at_random_points_leave_nothing_partial(backend, servers, tmp_path):
    """SIGKILL writers that loop until killed, each a process forked from the server in
    tests/crash_writer.py, 4 per round, 10 rounds on the local disk and 5 on the S3 API of a
    moto server (40 and 20 kills):

    - register (2 at once: 20 and 10 kills): `registry.register` of versions of model `cat`
      (claim, model.safetensors, model.json), as `dcml train` ends;
    - preprocess (10 and 5 kills): the write half of `preprocess` without Ray (the same
      `ReadAndClean`, `keep_rows`, `ShardTask` per raw file and `Commit` of the version's
      manifest) into dataset versions datasets/crash/<12 hex digits> for seeds 1, 2, ...;
    - predict (10 and 5 kills): `predict_batch` with the local engine (threads, one output file
      per input file of 4 rows, then the `Commit`) into outputs
      preds/000, preds/001, ....

    Each is killed by a process of its own at a random moment after it is ready (random.Random
    with a fixed seed; see `kill_round`), so kills land before a thing's first write (cleaning,
    predicting, loading the model), in a claim, a weights or shard write, a manifest's create,
    after it, or between things; the test counts where (`where`, printed with -s). After each
    round: `Checks`. The next round's preprocess and predict writers start with the thing the
    last ones were killed in: a rerun over its debris. At the end: one more registration, and
    the dataset version and the output the last writers were killed in, written again in this
    process; then every version and output is checked in full.
    """
    rng = random.Random(0 if backend == "local" else 1)
    raw_local = tmp_path / "raw"
    raw_local.mkdir()
    for i, t in enumerate(raw_tables()):
        (raw_local / f"part-{i}.parquet").write_bytes(parquet_bytes(t))
    pred_local = tmp_path / "pred-in"  # what the predict writers score
    pred_local.mkdir()
    for i, t in enumerate(input_batches(3, 4)):
        (pred_local / f"part-{i}.parquet").write_bytes(parquet_bytes(t))
    if backend == "s3":
        options = servers[1].options()
        root, raw_uri, warmup = f"s3://{BUCKET}/store", f"s3://{BUCKET}-raw", f"s3://{BUCKET}-warm"
        pred_uri = f"s3://{BUCKET}-pred"
        for local, uri in ((raw_local, raw_uri), (pred_local, pred_uri)):
            up = Storage(uri, options)  # buckets apart: moto lists one by going through all keys
            for f in sorted(local.iterdir()):
                up.fs.pipe_file(up.path(f.name), f.read_bytes())
    else:
        options, root, raw_uri = {}, str(tmp_path / "store"), str(raw_local)
        warmup, pred_uri = str(tmp_path / "warm"), str(pred_local)
    storage = Storage(root, options)

    register_tiny_model(storage, tmp_path / "tiny")  # cat@1, and its checkpoint in storage
    checkpoint = storage.path("checkpoints", "tiny")
    meta = model_meta(tmp_path / "meta")
    scorer = registry.register(storage, "scorer", checkpoint, meta)
    raw_cfg = {
        "storage": {"root": root, "storage_options": options},
        "data": {"name": DATASET, "source": raw_uri},
    }
    # dataset versions in order: the seed (which picks the split) and a name like preprocess's
    versions = [[seed, hashlib.sha256(b"%d" % seed).hexdigest()[:12]] for seed in range(1, 80)]
    outputs = [storage.uri("preds", f"{i:03d}") for i in range(300)]
    pre = transforms()
    pre_fields = {k: v for k, v in pre.to_json().items() if k != "version"}
    common = {"root": root, "options": options, "warmup": warmup}
    checks = Checks(storage, options)
    next_version = next_output = 0
    # where each kill landed, by kind: before the thing's first write (cleaning, predicting,
    # loading the model), among its writes (a file or claim of it stored, no manifest), after
    # its manifest (committed, marker not yet written), between two things
    where = {k: Counter() for k in ("register", "preprocess", "predict")}
    seen_files: dict[str, set] = {}

    def landed(folder: Storage, committed: bool) -> str:
        files = set(folder.sizes(folder.root))
        new = files - seen_files.get(folder.root, set())
        seen_files[folder.root] = files
        return "after its manifest" if committed else "among its writes" if new else "before"

    folder = tmp_path / "markers"
    folder.mkdir()
    for _ in range(ROUNDS[backend]):
        reg = {"kind": "register", **common, "name": "cat", "checkpoint": checkpoint}
        cmds = [
            {**reg, "meta": meta, "count": 1000},
            {**reg, "meta": meta, "count": 1000},
            {
                "kind": "preprocess",
                "warmup": common["warmup"],
                "config": raw_cfg,
                "pre": pre_fields,
                "versions": versions[next_version:],
            },
            {
                "kind": "predict",
                **common,
                "model_ref": scorer.ref,
                "input": pred_uri,
                "outputs": outputs[next_output:],
            },
        ]
        registering = []
        killed = kill_round(servers[0], rng, cmds, folder)
        storage.fs.invalidate_cache()  # what this process listed before, the writers changed
        for w in killed:
            if w.in_progress is None:
                where[w.kind]["between"] += 1
            if w.kind == "register":
                for ln in w.committed:  # the version the writer was told it got holds its token
                    checks.tokens.setdefault(ln[3], ("cat", int(ln[4])))
                if w.in_progress:
                    registering.append(w.in_progress[3])
            elif w.kind == "preprocess":
                next_version += len(w.committed)
                if w.in_progress:
                    version = w.in_progress[3]
                    done = find_version(storage, DATASET, version) is not None
                    uri = storage.to_uri(dataset_folder(storage, DATASET, version))
                    where[w.kind][landed(Storage(uri, options), done)] += 1
                    next_version += done  # killed after its commit, before its marker
            else:
                for ln in w.committed:
                    assert checks.check_output(ln[3])
                next_output += len(w.committed)
                if w.in_progress:
                    done = checks.check_output(w.in_progress[3])
                    where[w.kind][landed(Storage(w.in_progress[3], options), done)] += 1
                    next_output += done
        abandoned = len(checks.abandoned)
        checks.all(outputs=outputs[: next_output + 1], latest=backend == "local")
        # a claim stored and no model.json: a registration killed among its writes
        among = len(checks.abandoned) - abandoned
        after = sum(token in checks.tokens for token in registering)
        where["register"].update(
            {
                "among its writes": among,
                "after its manifest": after,
                "before": len(registering) - among - after,
            }
        )
        listed = [v.version for v in list_versions(storage, DATASET)]
        assert sorted(listed) == sorted(v for _, v in versions[:next_version])

    # reruns: the thing each last writer was killed in, or the next one
    dataset_seed, dataset_version = versions[next_version]
    output = outputs[next_output]
    cfg = parse_config({**raw_cfg, "seed": dataset_seed})
    write_dataset_version(cfg, storage, RawInput(cfg, storage), dataset_version, pre)
    write_predictions(storage, scorer.ref, pred_uri, output)
    mv = register_one(storage, "cat", checkpoint, meta, "final")
    assert registry.resolve_model(storage, "cat@latest").version == mv.version
    assert find_version(storage, DATASET, dataset_version) is not None
    checks.all(full=True, outputs=outputs[: next_output + 1])
    assert checks.check_output(output)
    left = collect_debris(storage, checks, outputs[: next_output + 1])
    committed = len([k for k in checks.models if k[0] == "cat"])
    print(
        f"\n{backend}: kills landed {json.dumps({k: dict(c) for k, c in where.items()})}; "
        f"committed {committed} versions of cat, {len(checks.datasets)} dataset versions, "
        f"{next_output + 1} outputs; {len(checks.abandoned)} numbers abandoned; "
        f"gc found and removed {left} debris files"
    )
    assert sum(sum(c.values()) for c in where.values()) == 4 * ROUNDS[backend]
    # where kills land is up to chance and the machine's load (the counts are printed); that
    # some landed among writes is all this asserts
    assert sum(c["among its writes"] for c in where.values()) > 0
