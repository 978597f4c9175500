"""Shared storage: concurrent writers on the local disk and on an S3 API server (moto), the
promotion gate, and verification of committed versions."""

from __future__ import annotations

import math
import threading

import pytest

from dcml import layout, registry
from dcml.cli import main
from dcml.data.catalog import list_versions, verify_dataset
from dcml.predictor import Predictor
from dcml.storage import Commit, DamagedError, Storage, check_files, read_manifest

from .conftest import make_config, moto_s3, preprocessed, start_dcml, tiny_categorical_model


@pytest.fixture(scope="module")
def s3_options():
    with moto_s3("dcml-shared") as options:
        yield options


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty storage root on the local disk or on the S3 API server."""
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    options = request.getfixturevalue("s3_options")
    return Storage(f"s3://dcml-shared/{tmp_path.name}", options)


def checkpoint(storage: Storage, folder) -> tuple[str, dict]:
    """A tiny model's checkpoint in storage, and its metadata (test metrics added)."""
    meta = tiny_categorical_model(folder)
    path = storage.path("checkpoints", "tiny")
    storage.fs.makedirs(path, exist_ok=True)
    for f in folder.iterdir():
        storage.fs.put_file(str(f), f"{path}/{f.name}")
    meta["config"] = {"train": {"metric": "val_loss", "mode": "min"}}
    return path, meta


def at_once(n: int, fn) -> list:
    """fn(i) for i < n in threads released together; results (or exceptions) in order."""
    start, out = threading.Barrier(n), [None] * n

    def run(i):
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # returned, so the test names it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def own_storage(store: Storage) -> Storage:
    """The same root with a filesystem instance of its own (no shared listing cache), as
    another process would have."""
    return Storage(store.uri(), {**store.options, "skip_instance_cache": True})


class MeetBeforeWriting(Storage):
    """`own_storage`, whose first write waits for the other writers sharing `meet`: what each
    read before writing, they all read before any of them wrote."""

    def __init__(self, store: Storage, meet: threading.Barrier):
        super().__init__(store.uri(), {**store.options, "skip_instance_cache": True})
        self.meet, self.met = meet, False

    def create(self, path: str, data: bytes) -> None:
        if not self.met:
            self.met = True
            self.meet.wait(timeout=60)
        super().create(path, data)


def test_concurrent_registrations_get_distinct_complete_versions(store, tmp_path):
    """4 writers register one model name at once: 4 numbers, each version whole."""
    path, meta = checkpoint(store, tmp_path / "ckpt")
    meta["metrics"] = {"test_loss": 0.5}

    def register(_):  # each writer with its own filesystem instance, as another process has
        return registry.register(own_storage(store), "m", path, meta).version

    versions = sorted(at_once(4, register))
    assert versions == [1, 2, 3, 4]
    assert registry.list_models(store) == {"m": [1, 2, 3, 4]}
    for v in versions:
        mv = registry.get_version(store, "m", v)
        assert registry.verify_version(store, mv) == []
        assert Predictor.from_storage(store, mv.path).version == f"m@{v}"


def test_concurrent_promotions_keep_every_entry_and_roll_back_in_order(store, tmp_path):
    """8 writers promote 8 versions to one alias at once; none is lost from the history."""
    path, meta = checkpoint(store, tmp_path / "ckpt")
    for _ in range(8):
        registry.register(store, "m", path, {**meta, "metrics": {"test_loss": 0.5}})

    def promote(i):
        return registry.set_alias(own_storage(store), "m", "production", i + 1)

    results = at_once(8, promote)
    assert not [r for r in results if isinstance(r, Exception)], results
    history = registry.alias_history(store, "m", "production")
    promoted = [h["version"] for h in history]
    assert sorted(promoted) == list(range(1, 9)) and all(h["by"] for h in history)
    assert registry.resolve_model(store, "m@production").version == promoted[-1]
    # two operators undo the same version at once (both read the history before either
    # writes): it is undone once, the other is told
    meet = threading.Barrier(2)
    undone = at_once(
        2, lambda _: registry.rollback(MeetBeforeWriting(store, meet), "m", "production")
    )
    assert sorted(map(type, undone), key=str) == sorted([int, RuntimeError], key=str), undone
    assert "meanwhile; not rolled back" in str(next(e for e in undone if isinstance(e, Exception)))
    for expected in reversed(promoted[:-2]):  # rollback walks the history back in order
        assert registry.rollback(store, "m", "production") == expected
    with pytest.raises(LookupError, match="no earlier version"):
        registry.rollback(store, "m", "production")


def test_a_create_that_got_through_before_its_answer_was_lost_is_won_not_lost(store):
    """A PUT resent after a lost answer (or an NFS retry) finds its own record: won, not lost;
    another writer's record there is lost."""
    path = store.path("records", "r.json")
    record = {"writer": "me", "n": 1}
    assert store.create_owned(path, record) is True
    assert store.create_owned(path, record) is True  # the retry finds its own
    assert store.create_owned(path, {"writer": "someone else"}) is False
    assert store.read_json(path) == record


class Busy(Storage):
    """A store where removing fails, as removing a folder another writer is still writing into
    (or removing itself) does."""

    def remove(self, path: str) -> None:
        raise OSError(39, "Directory not empty", path)


def test_a_commit_stands_when_other_writers_files_cannot_be_removed_and_abort_keeps_it(store):
    """Two writers of one folder (two runs of one config); the winner's clean-up of the loser's
    prefix fails, and its caller then fails too and aborts: the committed files stay (seen as
    a dataset whose manifest listed missing files, when concurrent preprocess runs raced)."""
    busy = Busy(store.uri(), store.options)
    folder = store.path("datasets", "d", "v1")
    loser, winner = Commit(store, folder), Commit(busy, folder)
    loser.put("part-0.parquet", b"theirs")
    winner.put("part-0.parquet", b"ours")
    manifest = winner.commit({"name": "d"})
    winner.abort()  # a failure after the commit, in the caller's clean-up
    assert check_files(store, folder, manifest) == []
    assert sorted(store.ls(folder)) == sorted(["_manifest.json", loser.prefix, winner.prefix])
    with pytest.raises(FileExistsError):
        loser.commit({"name": "d"})
    loser.abort()
    assert sorted(store.ls(folder)) == ["_manifest.json", winner.prefix]
    assert check_files(store, folder, manifest) == []


def version_with(storage, path, meta, dataset="d@1", **metrics):
    full = {**meta, "metrics": metrics, "lineage": {"dataset": dataset}}
    return registry.register(storage, "g", path, full).version


def test_the_gate_refuses_missing_nan_and_worse_metrics_and_force_is_recorded(tmp_path):
    store = Storage(str(tmp_path / "store"))
    path, meta = checkpoint(store, tmp_path / "ckpt")  # train.metric val_loss, mode min
    good = version_with(store, path, meta, test_loss=0.30)
    worse = version_with(store, path, meta, test_loss=0.50)
    nan = version_with(store, path, meta, test_loss=math.nan)
    missing = version_with(store, path, meta, test_roc_auc=0.99)
    other_data = version_with(store, path, meta, dataset="d@2", test_loss=0.9)
    better = version_with(store, path, meta, test_loss=0.10)

    with pytest.raises(registry.PromotionRefused, match="no usable test_loss"):
        registry.set_alias(store, "g", "production", nan)  # not even as the first version
    assert registry.set_alias(store, "g", "production", good) is None
    refusals = {
        worse: r"test_loss 0.5 but g@1 has 0.3",
        nan: r"no usable test_loss \(nan\)",
        missing: r"no usable test_loss \(None\)",
        other_data: r"tested on different datasets: d@2 and d@1",
    }
    for version, message in refusals.items():
        with pytest.raises(registry.PromotionRefused, match=message):
            registry.set_alias(store, "g", "production", version)
    assert registry.set_alias(store, "g", "production", better) == good
    assert registry.set_alias(store, "g", "production", nan, force=True) == better
    last = registry.alias_history(store, "g", "production")[-1]
    assert (last["version"], last["forced"]) == (nan, True) and "@" in last["by"] and last["at"]
    # the current version's metric is NaN now: nothing can be compared with it unforced
    with pytest.raises(registry.PromotionRefused, match=r"g@3 has no usable test_loss"):
        registry.set_alias(store, "g", "production", better)


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_one_changed_byte_is_named_by_verify_and_refused_by_training_and_serving(
    ray_session, tmp_path, capsys
):
    root, dv = preprocessed(tmp_path / "store")
    at = ["--set", f"storage.root={root}"]
    assert main(["data", "verify", dv.ref, *at]) == 0
    shard = root / "datasets" / dv.name / dv.version / dv.manifest["shards"][0]["name"]
    flip_byte(shard)
    (shard.parent / "stray.parquet").write_bytes(b"not listed")
    capsys.readouterr()
    assert main(["data", "verify", dv.ref, *at]) == 1
    err = capsys.readouterr().err
    assert f"altered: {shard} (SHA-256 differs" in err
    assert f"extra: {shard.parent / 'stray.parquet'}" in err

    # training with storage.verify refuses it before any work; without, sizes are checked
    from dcml.pipeline import stage_train

    cfg = make_config(root, storage={"root": str(root), "verify": True})
    with pytest.raises(DamagedError, match=f"altered: {shard}"):
        stage_train(cfg, dv.ref, run_id="refused", log=lambda _: None)
    shard.unlink()
    with pytest.raises(DamagedError, match=f"missing: {shard}"):
        stage_train(make_config(root), dv.ref, run_id="refused-too", log=lambda _: None)

    # a model whose weights changed: verify names the file, serving and scoring refuse it
    storage = Storage(str(root))
    ckpt, meta = checkpoint(storage, tmp_path / "ckpt")
    mv = registry.register(storage, "m", ckpt, {**meta, "metrics": {"test_loss": 0.1}})
    weights = root / "models" / "m" / "1" / layout.WEIGHTS
    flip_byte(weights)
    assert main(["models", "verify", "m@1", *at]) == 1
    assert f"altered: {weights} (SHA-256 differs" in capsys.readouterr().err
    with pytest.raises(DamagedError, match=str(weights)):
        Predictor.from_storage(storage, mv.path)
    from dcml.serving import deploy

    with pytest.raises(DamagedError, match="model m@1 is damaged"):
        deploy(make_config(root), "m@1")


def test_concurrent_preprocess_runs_converge_on_one_version_per_config(ray_session, tmp_path):
    """2 `dcml preprocess` processes of one config and 1 of another at once, on one storage root
    (they also race to collect the bundled raw data): 2 versions, each whole, every run exits 0
    naming its config's version."""
    root = tmp_path / "store"
    raw = {"storage": {"root": str(root)}}
    runs = []
    for i, seed in enumerate([0, 0, 1]):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        runs.append((seed, folder, start_dcml(folder, {**raw, "seed": seed}, "preprocess")))
    named = {}
    for seed, folder, proc in runs:
        assert proc.wait(timeout=300) == 0, (folder / "dcml.log").read_text()[-2000:]
        named.setdefault(seed, set()).add(
            next(
                line.split()[-1]
                for line in (folder / "dcml.log").read_text().splitlines()
                if line.startswith("dataset: ")
            )
        )
    assert all(len(refs) == 1 for refs in named.values()) and named[0] != named[1]
    storage = Storage(str(root))
    versions = list_versions(storage, "breast_cancer")
    assert sorted(v.ref for v in versions) == sorted(r for refs in named.values() for r in refs)
    for dv in versions:
        assert verify_dataset(storage, dv) == []


def test_gc_lists_only_what_nothing_needs_and_deletes_it_with_yes(tmp_path, capsys):
    from dcml.storage import Commit, to_json

    storage = Storage(str(tmp_path / "store"))
    at = ["--set", f"storage.root={storage.root}"]
    # finished runs: one a model came from, one nothing came from; and one not finished (it
    # may be resumed); each with two checkpoints and Ray's snapshot of them
    for run_id in ("kept", "dropped", "running"):
        for n in (1, 2):
            storage.write_bytes(storage.path("runs", run_id, f"checkpoint_00000{n}", "w"), b"x")
        storage.write_bytes(storage.path("runs", run_id, "checkpoint_manager_snapshot.json"), b"")
        record = {"run_id": run_id, "dataset": f"d@{run_id}", "created_at": 0}
        storage.create(storage.path("runs", run_id, "run.json"), to_json(record).encode())
        if run_id != "running":
            storage.write_json(storage.path("runs", run_id, "test_metrics.json"), {})
    ckpt, meta = checkpoint(storage, tmp_path / "ckpt")
    used = storage.path("runs", "kept", "checkpoint_000002")
    lineage = {"run_id": "kept", "checkpoint": used, "dataset": "d@model"}
    registry.register(storage, "m", ckpt, {**meta, "lineage": lineage})
    # dataset versions: named by a run, by a model, by nothing; a crashed writer beside one
    for version in ("kept", "model", "orphan"):
        commit = Commit(storage, storage.path("datasets", "d", version))
        commit.put("train/part.parquet", b"rows")
        commit.commit({"created_at": 0})
    crashed = Commit(storage, storage.path("datasets", "d", "kept"))
    crashed.put("train/part.parquet", b"half")
    # a registration that died after taking number 2 and writing its weights
    storage.write_bytes(f"{storage.path('models', 'm', str(registry._claim(storage, 'm')))}/w", b"")
    # an unreadable manifest is reported, and its folder left alone
    storage.write_bytes(storage.path("datasets", "d", "broken", "_manifest.json"), b"{not json")

    assert main(["gc", "--older-than", "1d", *at]) == 0
    assert "nothing to collect" in capsys.readouterr().out  # all of it is too new
    assert main(["gc", "--older-than", "0", *at]) == 0
    listed = capsys.readouterr().out
    orphan = storage.path("datasets", "d", "orphan")
    expected = {
        ("abandoned write", crashed.base),
        ("abandoned write", storage.path("models", "m", "2", "w")),
        ("unused checkpoint", storage.path("runs", "dropped", "checkpoint_000001")),
        ("unused checkpoint", storage.path("runs", "dropped", "checkpoint_000002")),
        ("unreferenced dataset", f"{orphan}/{read_manifest(storage, orphan)['prefix']}"),
    }
    lines = listed.splitlines()
    assert lines[0].startswith("skipped (unreadable): ") and "broken/_manifest.json" in lines[0]
    rows = {(line[:22].strip(), line.split()[-1]) for line in lines[1:-1]}
    assert rows == expected and "5 item(s); run again with --yes" in listed
    assert main(["gc", "--older-than", "0", "--yes", *at]) == 0
    assert "deleted 5 item(s)" in capsys.readouterr().out
    assert main(["gc", "--older-than", "0", *at]) == 0
    assert "nothing to collect" in capsys.readouterr().out
    # what something references, or may still resume, is all still there, whole
    storage.remove(storage.path("datasets", "d", "broken"))  # (listing versions names it too)
    assert [v.version for v in list_versions(storage, "d")] == ["kept", "model"]
    assert all(verify_dataset(storage, v) == [] for v in list_versions(storage, "d"))
    assert registry.verify_version(storage, registry.get_version(storage, "m", 1)) == []
    assert storage.exists(used) and storage.exists(storage.path("runs", "dropped", "run.json"))
    assert storage.exists(storage.path("runs", "running", "checkpoint_000001"))
    assert storage.exists(storage.path("runs", "dropped", "checkpoint_manager_snapshot.json"))
    assert registry._claim(storage, "m") == 3  # a number once taken is never given again
