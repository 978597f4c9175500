"""s3:// for real: an S3 API server on loopback (moto's server mode) holds shards and versions."""

import re

import numpy as np
import pytest

from dcml.cli import main
from dcml.data.catalog import list_versions, read_split_numpy
from dcml.data.errors import DataError
from dcml.data.preprocess import preprocess
from dcml.storage import Storage

from .conftest import make_config, moto_s3

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def s3():
    with moto_s3("dcml-test") as options:
        yield options


def s3_config(options, **data):
    return make_config(
        "s3://dcml-test/store",
        storage={"root": "s3://dcml-test/store", "storage_options": options},
        data=data,
    )


def test_raw_shards_and_dataset_versions_on_s3(s3, capsys):
    flow = "{" + ", ".join(f"{k}: '{v}'" for k, v in s3.items()) + "}"
    at = ["--set", "storage.root=s3://dcml-test/store", "--set", f"storage.storage_options={flow}"]
    # the synthetic generator writes its shards from Ray tasks straight to S3
    assert (
        main(
            ["data", "synth", "--rows", "3000", "--shards", "3", "--out", "s3://dcml-test/raw", *at]
        )
        == 0
    )
    assert main(["data", "synth", "--rows", "10", "--out", "s3://dcml-test/raw", *at]) == 1
    assert "exists" in capsys.readouterr().err

    cfg = s3_config(s3, name="syn", source="s3://dcml-test/raw")
    storage = Storage.from_config(cfg)
    dv = preprocess(cfg, storage, log=lambda _: None)
    m = dv.manifest
    # the synthetic data's committed files: under its writer's prefix, listed by its manifest
    assert [re.sub(r"/tx-[^/]+/", "/", f) for f in m["source_files"]] == [
        f"s3://dcml-test/raw/part-0000{i}.parquet" for i in range(3)
    ]
    assert m["rows"]["dropped"]["duplicate"] > 0
    for shard in m["shards"]:
        assert storage.exists(f"{dv.path}/{shard['name']}")
    ids, x, y = read_split_numpy(storage, dv, "train")
    assert len(ids) == m["rows"]["train"] and np.isfinite(x).all()
    assert [v.version for v in list_versions(storage, "syn")] == [dv.version]
    assert preprocess(cfg, storage, log=lambda _: None).version == dv.version  # reused

    assert main(["data", "list", *at]) == 0
    assert f"syn@{dv.version}" in capsys.readouterr().out
    assert main(["data", "show", "syn", *at]) == 0
    assert "s3://dcml-test/raw (3 parquet file(s))" in capsys.readouterr().out
    assert main(["data", "verify", "syn", *at]) == 0
    assert "match the manifest" in capsys.readouterr().out


def test_missing_s3_source_names_the_uri(s3):
    cfg = s3_config(s3, name="none", source="s3://dcml-test/nowhere")
    with pytest.raises(DataError, match="s3://dcml-test/nowhere"):
        preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
