"""The data stage on a real local Ray: ingest, cleaning, transforms, gate, versions, bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dcml.data.catalog import list_versions, read_split_numpy, resolve_dataset
from dcml.data.errors import DataError
from dcml.data.gate import GateError
from dcml.data.preprocess import preprocess
from dcml.data.synth import encode, synth_table
from dcml.storage import Storage

from .conftest import make_config, quiet, run, write_shards

pytestmark = pytest.mark.usefixtures("ray_session")


def small(n: int, seed: int = 0, inf_rows: tuple = ()) -> pa.Table:
    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=n), rng.normal(size=n)
    f1[list(inf_rows)] = np.inf
    label = ((f1 + f2) > 0).astype(np.int64)
    return pa.table({"id": np.arange(n), "f1": f1, "f2": f2, "label": label})


def stored(tmp_path, name="syn") -> list:
    """Files under the dataset's folder: committed or a writer's leftovers."""
    folder = tmp_path / "store" / "datasets" / name
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_bundled_data_is_collected_split_gated_and_versioned(tmp_path):
    cfg = make_config(tmp_path / "store")
    storage = Storage.from_config(cfg)
    dv = preprocess(cfg, storage, log=quiet)

    m = dv.manifest
    assert m["rows"]["raw"] == 569
    assert sum(m["rows"][s] for s in ("train", "validation", "test")) == 569
    assert len(list((tmp_path / "store" / "raw" / "breast_cancer").glob("tx-*/*.parquet"))) == 4
    assert len(m["features"]) == 30 and m["classes"] == [0, 1]
    assert m["gate"]["passed"] is True
    assert len(m["content_hash"]) == 64
    assert "storage_options" not in m["config"]["data"]  # credentials are never stored
    for shard in m["shards"]:
        assert (
            tmp_path / "store" / "datasets" / "breast_cancer" / dv.version / shard["name"]
        ).is_file()
    # standardised on the training split (after clipping to the 0.1%/99.9% quantiles)
    _, x, y = read_split_numpy(storage, dv, "train")
    assert np.abs(x.mean(0)).max() < 1e-4 and np.abs(x.std(0) - 1).max() < 1e-3
    assert set(np.unique(y)) == {0, 1}

    # the same inputs and config find the stored version; nothing is rewritten
    manifest = tmp_path / "store" / "datasets" / "breast_cancer" / dv.version / "_manifest.json"
    mtime = manifest.stat().st_mtime_ns
    again = preprocess(cfg, storage, log=quiet)
    assert again.version == dv.version and manifest.stat().st_mtime_ns == mtime
    assert [v.version for v in list_versions(storage, "breast_cancer")] == [dv.version]
    assert resolve_dataset(storage, "breast_cancer@latest").version == dv.version

    # another seed is another split, so another version
    other = preprocess(make_config(tmp_path / "store", seed=1), storage, log=quiet)
    assert other.version != dv.version
    assert resolve_dataset(storage, "breast_cancer").version == other.version


def test_cleaning_counts_every_dropped_row_and_encodes_categories(tmp_path):
    table = pa.concat_tables([synth_table(1500, s, 1500 * s, seed=3) for s in range(3)])
    write_shards(tmp_path / "raw", table, 3)
    dv, storage = run(tmp_path, impute_columns={"num_1": "drop"}, clip_quantiles=[0.01, 0.99])
    m = dv.manifest
    rows, dropped = m["rows"], m["rows"]["dropped"]
    kept = sum(rows[s] for s in ("train", "validation", "test"))
    assert rows["raw"] == table.num_rows == kept + sum(dropped.values())
    assert dropped["missing_label"] == table.column("label").null_count
    assert dropped["duplicate"] > 0 and dropped["missing_value"] > 0
    # one-hot with an unknown bucket; categories fitted on the training split
    assert m["columns"]["categorical"] == ["color", "region"]
    assert "color=red" in m["features"] and "color=<unknown>" in m["features"]
    pre = dv.preprocessor
    assert pre.categories["color"] == sorted(["red", "green", "blue", "black", "white"])
    # what `dcml monitor` compares traffic with: the training split's distributions
    train = table.filter(
        pc.is_in(table.column("id"), pa.array(read_split_numpy(storage, dv, "train")[0]))
    )
    ref = pre.reference["numeric"]["num_0"]
    assert len(ref["points"]) > 50 and ref["cdf"][-1] == 1.0
    median = ref["points"][int(np.searchsorted(ref["cdf"], 0.5))]
    assert median == pytest.approx(
        np.nanmedian(train.column("num_0").to_numpy(zero_copy_only=False)), abs=0.1
    )
    shares = pre.reference["categorical"]["color"]["frequencies"]
    counts = pc.value_counts(pc.drop_null(train.column("color"))).to_pylist()
    total = sum(c["counts"] for c in counts)
    # (the ids of the stored rows also pick their dropped duplicates: a share differs slightly)
    assert {c["values"]: c["counts"] / total for c in counts} == pytest.approx(shares, abs=0.005)
    # outliers (0.5% of values, x50) clipped to the fitted 1%/99% quantiles
    ids, x, _ = read_split_numpy(storage, dv, "train")
    assert np.abs(x[:, : len(pre.numeric)]).max() < 4
    assert len(np.unique(ids)) == len(ids)  # duplicates are gone
    # missing categories land in the unknown bucket; missing numbers are imputed
    assert x[:, m["features"].index("color=<unknown>")].sum() > 0
    assert np.isfinite(x).all()

    # serving's path (raw columns through the stored preprocessor state) gives the stored rows
    test_ids, test_x, _ = read_split_numpy(storage, dv, "test")
    raw = table.filter(pc.is_in(table.column("id"), pa.array(test_ids)))
    _, first = np.unique(raw.column("id").to_numpy(), return_index=True)
    raw = raw.take(pa.array(first))  # ids are unique: copies of a row are equal
    by_id = np.argsort(test_ids)
    np.testing.assert_allclose(
        pre.transform({c: raw.column(c) for c in pre.inputs}), test_x[by_id], rtol=1e-6
    )


def test_split_depends_on_the_id_not_the_layout_or_format(tmp_path):
    table = synth_table(1200, 0, 0, seed=5)
    write_shards(tmp_path / "a", table, 2, "parquet")
    write_shards(tmp_path / "b", table, 5, "csv")
    write_shards(tmp_path / "c", table, 3, "json")
    splits = []
    for name in "abc":
        dv, storage = run(tmp_path, name=name, source=tmp_path / name)
        assert dv.manifest["format"] == {"a": "parquet", "b": "csv", "c": "json"}[name]
        splits.append({s: set(read_split_numpy(storage, dv, s)[0]) for s in ("train", "test")})
    assert splits[0] == splits[1] == splits[2]
    assert 0.6 < len(splits[0]["train"]) / 1200 < 0.8


def test_file_and_memory_uris(tmp_path):
    import fsspec

    table = synth_table(600, 0, 0, seed=2)
    write_shards(tmp_path / "raw", table, 2, "csv")
    local, _ = run(tmp_path, name="local")
    by_uri, _ = run(tmp_path, name="uri", source=f"file://{tmp_path}/raw/*.csv")
    # memory:// lives in this process only; its files travel to Ray's workers as bytes
    mem, folder = fsspec.filesystem("memory"), f"/dcml-test/{tmp_path.name}"
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), 2)):
        mem.pipe(f"{folder}/part-{i}.csv", encode(table.take(pa.array(part)), "csv"))
    in_memory, _ = run(tmp_path, name="mem", source=f"memory://{folder}")
    hashes = {dv.manifest["content_hash"] for dv in (local, by_uri, in_memory)}
    assert len(hashes) == 1  # the same rows, transforms and shards from every URI
    # the same bytes under another path are the same version: it is found, not built again
    again, _ = run(tmp_path, name="local", source=f"file://{tmp_path}/raw")
    assert again.version == local.version and again.path == local.path


def test_minmax_ordinal_and_rows_without_ids(tmp_path):
    write_shards(tmp_path / "raw", synth_table(800, 0, 0).drop_columns(["id"]), 2)
    dv, storage = run(
        tmp_path, id_column=None, scaling="minmax", encoding="ordinal", clip_quantiles=None
    )
    assert dv.manifest["features"][-2:] == ["color", "region"]
    _, x, _ = read_split_numpy(storage, dv, "train")
    numeric = len(dv.preprocessor.numeric)
    assert x[:, :numeric].min() >= -1e-6 and x[:, :numeric].max() <= 1 + 1e-6
    assert set(np.unique(x[:, numeric])) <= {0, 1, 2, 3, 4, 5}  # 0 is unknown


def test_multiclass_and_regression_labels(tmp_path):
    table = synth_table(900, 0, 0).drop_columns(["label"])
    table = table.append_column("kind", table.column("region")).drop_columns(["region"])
    write_shards(tmp_path / "raw", table, 2)
    dv, storage = run(tmp_path, label="kind", task="multiclass")
    assert dv.manifest["classes"] == [f"r{i:02d}" for i in range(20)]
    _, _, y = read_split_numpy(storage, dv, "train")
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(20))

    dv, storage = run(tmp_path, name="reg", label="num_0", task="regression", numeric=["num_1"])
    assert dv.manifest["classes"] is None and dv.manifest["schema"]["label"] == "double"
    assert dv.manifest["rows"]["dropped"]["missing_label"] > 0  # NaN targets


def test_gate_repairs_then_passes_or_stops_with_a_report(tmp_path):
    write_shards(tmp_path / "raw", small(300, inf_rows=(3, 77)), 3, fmt="csv")
    # no clipping: the infinities reach the gate, which drops them and checks again
    dv, _ = run(tmp_path, clip_quantiles=None)
    gate = dv.manifest["gate"]
    assert gate["passed"] and gate["dropped_rows"] == 2 and len(gate["rounds"]) == 2
    first = {c["check"]: c for c in gate["rounds"][0] if not c["passed"]}
    assert first["finite"]["column"] == "f1"
    assert {e["id"] for e in first["finite"]["examples"]} == {3, 77}
    assert {e["file"].rsplit("/", 1)[-1] for e in first["finite"]["examples"]} == {"part-0.csv"}
    assert dv.manifest["rows"]["dropped"]["gate_repair"] == 2

    dv, storage = run(tmp_path, name="imputed", clip_quantiles=None, gate={"repair": "impute"})
    assert dv.manifest["gate"]["imputed_values"] == 2
    assert sum(dv.manifest["rows"][s] for s in ("train", "validation", "test")) == 300

    with pytest.raises(GateError) as e:
        run(tmp_path, name="strict", clip_quantiles=None, gate={"repair": "none"})
    msg = str(e.value)
    assert "finite" in msg and "'f1'" in msg and "part-0.csv row 3 (id 3)" in msg
    assert stored(tmp_path, "strict") == []  # nothing committed, no temporary folder left

    with pytest.raises(GateError, match="min_rows"):
        run(tmp_path, name="tiny", gate={"min_rows_per_split": 1000})


def test_augmentation_touches_only_the_training_split(tmp_path):
    table = small(600)
    label = np.asarray(table.column("label"))
    keep = np.flatnonzero((label == 1) | (np.arange(600) % 3 == 0))  # class 0 is now rarer
    write_shards(tmp_path / "raw", table.take(pa.array(keep)), 2)
    base, storage = run(tmp_path)
    over, _ = run(tmp_path, name="over", augment={"oversample": True})
    noisy, _ = run(tmp_path, name="noisy", augment={"noise_std": 0.1, "noise_copies": 2})
    for dv in (over, noisy):
        for s in ("validation", "test"):
            assert dv.manifest["rows"][s] == base.manifest["rows"][s]
    _, _, y = read_split_numpy(storage, over, "train")
    counts = np.bincount(y)
    assert abs(counts[0] - counts[1]) <= 0.05 * counts.max()
    assert noisy.manifest["rows"]["train"] == 3 * base.manifest["rows"]["train"]
    assert noisy.manifest["rows"]["augmented"] == 2 * base.manifest["rows"]["train"]


def test_crash_debris_is_not_a_version_and_a_rerun_commits(tmp_path):
    write_shards(tmp_path / "raw", small(200), 2)
    dv, storage = run(tmp_path)
    folder = tmp_path / "store" / "datasets" / "syn"
    # what a kill mid-write leaves: a temporary folder, and a version folder with no manifest
    (folder / ".tmp-deadbeef" / "train").mkdir(parents=True)
    (folder / ".tmp-deadbeef" / "train" / "part-0.parquet").write_bytes(b"PAR1 half")
    (folder / dv.version / "_manifest.json").unlink()
    assert list_versions(storage, "syn") == []
    with pytest.raises(LookupError, match="no committed versions"):
        resolve_dataset(storage, "syn")
    again, _ = run(tmp_path)
    assert (
        again.version == dv.version
        and again.manifest["content_hash"] == dv.manifest["content_hash"]
    )
    assert [v.version for v in list_versions(storage, "syn")] == [dv.version]


# --- bad input: each names the file (and column and row) and writes nothing -----------------------


def bad_input(tmp_path, match: str, **data):
    with pytest.raises(DataError, match=match):
        run(tmp_path, **data)
    assert stored(tmp_path) == []


def test_missing_source(tmp_path):
    bad_input(tmp_path, "raw data not found: .*nowhere", source=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    bad_input(tmp_path, "no data files under .*empty", source=tmp_path / "empty")


def test_truncated_and_unreadable_shards(tmp_path):
    paths = write_shards(tmp_path / "raw", small(300), 3)
    paths[1].write_bytes(paths[1].read_bytes()[:200])
    bad_input(tmp_path, r"part-1\.parquet: not a readable parquet file")
    paths = write_shards(tmp_path / "csv", small(300), 3, fmt="csv")
    paths[2].write_bytes(paths[2].read_bytes() + b'1,2,"unclosed\n')
    bad_input(tmp_path, r"part-2\.csv: not a readable csv file", source=tmp_path / "csv")
    paths = write_shards(tmp_path / "json", small(300), 2, fmt="json")
    paths[1].write_bytes(paths[1].read_bytes() + b'{"id": 9999, "f1": \n')
    bad_input(tmp_path, r"part-1\.jsonl: not a readable json file", source=tmp_path / "json")


def test_missing_column_in_one_shard(tmp_path):
    paths = write_shards(tmp_path / "raw", small(300), 3)
    pq.write_table(pq.read_table(paths[2]).drop_columns(["f2"]), paths[2])
    bad_input(tmp_path, r"part-2\.parquet: column\(s\) \['f2'\] missing \(they are in .*part-0")
    bad_input(tmp_path, r"data.numeric: column\(s\) \['nope'\] not in the data", numeric=["nope"])
    # the features are inferred from the first file: a column only later files have would be
    # silently left out of the model; it is an error naming both files
    paths = write_shards(tmp_path / "extra", small(300), 3)
    pq.write_table(pq.read_table(paths[0]).drop_columns(["f2"]), paths[0])
    bad_input(
        tmp_path,
        r"part-1\.parquet: column\(s\) \['f2'\] are not in .*extra/part-0\.parquet, the first file",
        source=tmp_path / "extra",
    )
    # with every feature declared, the other columns are ignored, in any file
    dv, _ = run(tmp_path, source=tmp_path / "extra", numeric=["f1"], categorical=[])
    assert dv.manifest["features"] == ["f1"]


def test_files_with_no_rows_are_named(tmp_path):
    (tmp_path / "raw").mkdir()
    for i in range(2):
        (tmp_path / "raw" / f"part-{i}.csv").write_text("id,f1,f2,label\n")  # a header alone
    bad_input(tmp_path, r"no rows to read \(.*part-0\.csv, .*part-1\.csv hold a header or nothing")


def test_column_type_changed_between_shards(tmp_path):
    paths = write_shards(tmp_path / "raw", small(300), 3, fmt="csv")
    table = pacsv.read_csv(paths[1])
    f2 = pa.array([str(v) for v in table.column("f2").to_pylist()])
    f2 = pa.array(f2.to_pylist()[:5] + ["n/a?"] + f2.to_pylist()[6:])
    pacsv.write_csv(table.set_column(2, "f2", f2), paths[1])
    bad_input(tmp_path, r"part-1\.csv: column 'f2' row 5: 'n/a\?' is not a number")


def test_label_outside_the_declared_classes(tmp_path):
    table = small(300)
    label = table.column("label").to_numpy().copy()
    label[150 + 7] = 2
    paths = write_shards(tmp_path / "raw", table.set_column(3, "label", pa.array(label)), 2)
    bad_input(
        tmp_path,
        r"part-1\.parquet: column 'label' row 7: 2 is not one of the declared",
        classes=[0, 1],
    )
    bad_input(tmp_path, "binary but column 'label' has 3 distinct value", source=paths[1].parent)
    # the documented way round it: drop such rows and count them
    dv, _ = run(tmp_path, classes=[0, 1], invalid_labels="drop")
    assert dv.manifest["rows"]["dropped"]["invalid_label"] == 1


def test_manifest_is_json_with_the_report(tmp_path):
    write_shards(tmp_path / "raw", small(200), 2)
    dv, _ = run(tmp_path)
    text = (tmp_path / "store" / "datasets" / "syn" / dv.version / "_manifest.json").read_text()
    m = json.loads(text)
    for key in ("schema", "rows", "shards", "content_hash", "preprocessor", "gate", "config"):
        assert key in m
    assert m["preprocessor"]["version"] == 2 and m["columns"]["numeric"] == ["f1", "f2"]
