"""The data stage on a real local Ray: versions, reuse, the gate, and errors that name the input."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dcml.data.gate import GateError
from dcml.data.preprocess import list_versions, preprocess, read_split_numpy, resolve_dataset
from dcml.storage import Storage

from .conftest import make_config

pytestmark = pytest.mark.usefixtures("ray_session")


def synthetic(n: int, seed: int = 0, bad_rows: tuple = ()) -> pa.Table:
    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=n), rng.normal(size=n)
    f1[list(bad_rows)] = np.inf
    label = ((f1 + f2) > 0).astype(np.int64)
    return pa.table({"id": np.arange(n), "f1": f1, "f2": f2, "label": label})


def write_shards(folder, table: pa.Table, shards: int, fmt: str = "parquet") -> None:
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), shards)):
        chunk = table.take(pa.array(part))
        if fmt == "parquet":
            pq.write_table(chunk, folder / f"part-{i}.parquet")
        else:
            pacsv.write_csv(chunk, folder / f"part-{i}.csv")


def test_bundled_data_is_collected_split_gated_and_versioned(tmp_path):
    cfg = make_config(tmp_path / "store")
    storage = Storage.from_config(cfg)
    dv = preprocess(cfg, storage, log=lambda _: None)

    rows = dv.manifest["rows"]
    assert rows["raw"] == 569
    assert rows["train"] + rows["validation"] + rows["test"] == 569
    assert len(list((tmp_path / "store" / "raw" / "breast_cancer").glob("*.parquet"))) == 4
    assert len(dv.manifest["features"]) == 30
    assert dv.manifest["gate"]["passed"] is True
    # standardised on the training split: mean ~0, std ~1 there
    _, x, y = read_split_numpy(storage, dv, "train")
    assert np.abs(x.mean(0)).max() < 1e-4 and np.abs(x.std(0) - 1).max() < 1e-3
    assert set(np.unique(y)) == {0, 1}

    # the same inputs and config find the stored version; nothing is rewritten
    mtime = (
        tmp_path / "store" / "datasets" / "breast_cancer" / dv.version / "_manifest.json"
    ).stat()
    again = preprocess(cfg, storage, log=lambda _: None)
    assert again.version == dv.version
    assert (
        tmp_path / "store" / "datasets" / "breast_cancer" / dv.version / "_manifest.json"
    ).stat() == mtime
    assert [v.version for v in list_versions(storage, "breast_cancer")] == [dv.version]
    assert resolve_dataset(storage, "breast_cancer@latest").version == dv.version

    # another seed is another split, so another version
    other = preprocess(make_config(tmp_path / "store", seed=1), storage, log=lambda _: None)
    assert other.version != dv.version
    assert resolve_dataset(storage, "breast_cancer").version == other.version


def test_csv_source_and_gate_repairs_non_finite_rows(tmp_path):
    write_shards(tmp_path / "raw", synthetic(300, bad_rows=(3, 77)), 3, fmt="csv")
    cfg = make_config(
        tmp_path / "store", data={"name": "syn", "source": str(tmp_path / "raw"), "format": "csv"}
    )
    dv = preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    gate = dv.manifest["gate"]
    assert gate["passed"] and gate["repaired_rows"] == 2
    first = {c["check"]: c for c in gate["rounds"][0] if not c["passed"]}
    assert first["finite"]["column"] == "f1"
    assert {e["id"] for e in first["finite"]["examples"]} == {3, 77}
    assert sum(dv.manifest["rows"][s] for s in ("train", "validation", "test")) == 298


def test_gate_failure_stops_with_a_report_and_commits_nothing(tmp_path):
    write_shards(tmp_path / "raw", synthetic(300, bad_rows=(5,)), 2)
    cfg = make_config(
        tmp_path / "store",
        data={"name": "syn", "source": str(tmp_path / "raw"), "repair_rounds": 0},
    )
    with pytest.raises(GateError) as e:
        preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    msg = str(e.value)
    assert "finite" in msg and "'f1'" in msg and "part-0.parquet" in msg and "'id': 5" in msg
    assert not (tmp_path / "store" / "datasets" / "syn").exists() or not any(
        (tmp_path / "store" / "datasets" / "syn").iterdir()
    )


def test_bad_inputs_name_what_is_wrong(tmp_path):
    write_shards(tmp_path / "raw", synthetic(100), 2)
    cfg = make_config(
        tmp_path / "store",
        data={"name": "syn", "source": str(tmp_path / "raw"), "features": ["f1", "nope"]},
    )
    with pytest.raises(ValueError, match="'nope'"):
        preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    cfg = make_config(tmp_path / "store", data={"source": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="missing"):
        preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    with pytest.raises(LookupError, match="no committed versions"):
        resolve_dataset(Storage.from_config(cfg), "nothing")
