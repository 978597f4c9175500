"""What runs without Ray: splits, transforms, metrics, the loop, the predictor, the HTTP app."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score

from dcml.config import PipelineConfig, parse_config
from dcml.data.sources import breast_cancer_table
from dcml.data.split import SPLITS, assign_splits, hash64, unit_interval
from dcml.data.transforms import Preprocessor
from dcml.http_app import build_http_app
from dcml.predictor import Predictor
from dcml.train.checkpoint import load_checkpoint, save_checkpoint
from dcml.train.loop import fit_local
from dcml.train.metrics import binary_metrics, roc_auc
from dcml.train.model import build_model
from dcml.train.step import make_optimizer

from .conftest import tiny_categorical_model

FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}


def split_of(ids, seed=0):
    return np.asarray(SPLITS)[assign_splits(unit_interval(hash64(ids, seed)), FRACTIONS)]


def test_split_is_a_function_of_the_id_alone():
    ids = np.arange(10_000)
    whole = split_of(ids)
    # shuffled and chunked differently (another shard layout), the same id gets the same split
    perm = np.random.default_rng(1).permutation(ids)
    parts = np.concatenate([split_of(c) for c in np.array_split(perm, 7)])
    assert (parts == whole[perm]).all()
    counts = {s: (whole == s).mean() for s in FRACTIONS}
    assert abs(counts["train"] - 0.7) < 0.02 and abs(counts["test"] - 0.15) < 0.02
    assert (split_of(ids, seed=1) != whole).any()
    # string ids hash too, and the same text gives the same split
    text = np.array([f"user-{i}" for i in range(1000)], dtype=object)
    assert (split_of(text) == split_of(text.copy())).all()


def test_roc_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.5 + y * 0.3, 2)  # rounded: many ties
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    m = binary_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6]))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5


def numeric_pre(features, fill, center, scale, **kw) -> Preprocessor:
    return Preprocessor(
        numeric=list(features),
        categorical=[],
        fill=dict(fill),
        clip={},
        center=dict(center),
        scale=dict(scale),
        categories={},
        **kw,
    )


def test_preprocessor_state_is_json_and_imputes_clips_then_scales():
    pre = numeric_pre(["a", "b"], {"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 1.0})
    pre = Preprocessor.from_json({**pre.to_json(), "clip": {"b": [0.0, 4.0]}})
    state = json.loads(json.dumps(pre.to_json()))
    again = Preprocessor.from_json(state)
    x = again.transform({"a": pa.array([3.0, None]), "b": np.array([2.0, 50.0])})
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[1.0, 0.0], [0.0, 2.0]])  # 50 clipped to 4
    with pytest.raises(ValueError, match="version 1 is not supported"):
        Preprocessor.from_json({**state, "version": 1})


@pytest.mark.parametrize("encoding", ["onehot", "ordinal"])
def test_categories_encode_with_an_unknown_bucket(encoding):
    pre = Preprocessor(
        numeric=[],
        categorical=["color"],
        fill={},
        clip={},
        center={},
        scale={},
        categories={"color": ["blue", "red"]},
        encoding=encoding,
    )
    values = ["red", "green", None, "blue"]
    arrow = pre.transform({"color": pa.array(values)})
    np.testing.assert_array_equal(arrow, pre.transform({"color": values}))  # lists too
    if encoding == "onehot":
        assert pre.output_features == ["color=blue", "color=red", "color=<unknown>"]
        np.testing.assert_array_equal(arrow, [[0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    else:
        assert pre.output_features == ["color"]
        np.testing.assert_array_equal(arrow[:, 0], [2, 0, 0, 1])


def _breast_cancer_xy():
    t = breast_cancer_table()
    features = [c for c in t.column_names if c not in ("id", "label")]
    x = np.stack([t.column(c).to_numpy() for c in features], 1)
    splits = split_of(t.column("id").to_numpy())
    train = splits == "train"
    mean, std = x[train].mean(0), x[train].std(0)
    pre = numeric_pre(features, zip(features, mean), zip(features, mean), zip(features, std))
    return t, features, pre, splits


def table(x: np.ndarray, y: np.ndarray, features: list[str]) -> pa.Table:
    """A stored split's columns: id, label, the features."""
    cols = {"id": np.arange(len(y)), "label": y, **{f: x[:, j] for j, f in enumerate(features)}}
    return pa.table(cols)


def local_config(**sections) -> PipelineConfig:
    raw = {"train": {"workers": 1, "batch_size": 32, "weight_decay": 0.0}, "seed": 0}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


def test_a_resumed_run_goes_on_exactly_as_one_never_stopped(tmp_path):
    """Dropout draws from torch's generator: a resumed run restores its state from the
    checkpoint (re-seeding it would give other dropout masks, and other weights, from then on)."""
    t, features, pre, splits = _breast_cancer_xy()
    x = pre.transform({c: t.column(c).to_numpy() for c in features})
    y = t.column("label").to_numpy().astype(np.float32)
    tr, va = splits == "train", splits == "validation"
    data = {"train": table(x[tr], y[tr], features), "validation": table(x[va], y[va], features)}
    cfg = local_config(model={"depth": 2, "width": 16, "dropout": 0.3}, train={"epochs": 4})
    straight = fit_local(cfg, data, str(tmp_path / "straight"), features)
    first = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    fit_local(first, data, str(tmp_path / "resumed"), features)
    rest = fit_local(cfg, data, str(tmp_path / "resumed"), features)
    assert [int(h["epoch"]) for h in rest] == [2, 3]
    for a, b in zip(straight[2:], rest, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"], (a, b)


def test_the_loop_runs_without_ray_learns_logistic_regression_and_resumes(tmp_path):
    t, features, pre, splits = _breast_cancer_xy()
    cols = {c: t.column(c).to_numpy() for c in features}
    x, y = pre.transform(cols), t.column("label").to_numpy().astype(np.float32)
    tr, va = splits == "train", splits == "validation"
    data = {"train": table(x[tr], y[tr], features), "validation": table(x[va], y[va], features)}
    # depth 0: sigmoid(θᵀx), the seed's logistic regression, through the one training loop
    cfg = local_config(model={"depth": 0}, train={"optimizer": "sgd", "lr": 0.05, "epochs": 15})
    history = fit_local(cfg, data, str(tmp_path / "run"), features)
    assert len(history) == 15 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_roc_auc"] >= 0.98
    # the same run with a larger budget resumes from its last checkpoint, as under Ray
    more = fit_local(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 17})}),
        data,
        str(tmp_path / "run"),
        features,
    )
    assert [int(h["epoch"]) for h in more] == [15, 16]

    last = sorted((tmp_path / "run").glob("checkpoint_*"))[-1]
    spec = json.loads((last / "meta.json").read_text())["model_spec"]
    model = build_model(spec)
    assert load_checkpoint(str(last), model, None)[0] == 17
    opt = make_optimizer(model, "sgd", 0.05, 0.0)
    # a checkpoint round-trips without pickle, and the predictor reproduces the model
    save_checkpoint(str(tmp_path), model, opt, 14, {"model_spec": spec})
    fresh = build_model(spec)
    assert load_checkpoint(str(tmp_path), fresh, make_optimizer(fresh, "sgd", 0.05, 0.0))[0] == 15
    meta = {
        "name": "bc",
        "version": 1,
        "features": features,
        "preprocessor": pre.to_json(),
        "model_spec": spec,
    }
    (tmp_path / "model.json").write_text(json.dumps(meta))
    predictor = Predictor.from_dir(str(tmp_path))
    te = splits == "test"
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.as_tensor(x[te])).squeeze(-1)).numpy()
    np.testing.assert_allclose(
        predictor.predict_columns({c: v[te] for c, v in cols.items()}),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.fixture(scope="module")
def http_client(tmp_path_factory):
    t, features, pre, _ = _breast_cancer_xy()
    spec = {
        "kind": "mlp",
        "n_features": len(features),
        "n_outputs": 1,
        "depth": 1,
        "width": 8,
        "activation": "relu",
        "dropout": 0.0,
    }
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_model(spec)
    save_checkpoint(str(path), model, make_optimizer(model, "adam", 1e-3, 0), 0, {})
    meta = {
        "name": "bc",
        "version": 3,
        "features": features,
        "preprocessor": pre.to_json(),
        "model_spec": spec,
    }
    (path / "model.json").write_text(json.dumps(meta))
    app = build_http_app(Predictor.from_dir(str(path)), 20_000, "s3cret", "bc@production")
    row = {c: float(t.column(c)[0].as_py()) for c in features}
    return TestClient(app, raise_server_exceptions=False), row


def test_http_app_predicts_one_record_or_a_list(http_client):
    client, row = http_client
    auth = {"Authorization": "Bearer s3cret"}
    one = client.post("/predict", json=row, headers=auth)
    assert one.status_code == 200
    [pred] = one.json()["predictions"]
    assert pred["model_version"] == "bc@3" and 0 <= pred["probability"] <= 1
    many = client.post("/predict", json=[row, row], headers=auth).json()["predictions"]
    assert many == [pred, pred]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_http_app_rejects_bad_requests_with_the_field_named(http_client):
    client, row = http_client
    auth = {"Authorization": "Bearer s3cret"}
    assert client.post("/predict", json=row).status_code == 401
    assert (
        client.post("/predict", json=row, headers={"Authorization": "Bearer no"}).status_code == 401
    )
    missing = dict(row)
    del missing["mean radius"]
    r = client.post("/predict", json=missing, headers=auth)
    assert r.status_code == 422 and "mean radius" in r.text
    r = client.post("/predict", json={**row, "mean area": "big"}, headers=auth)
    assert r.status_code == 422 and "mean area" in r.text
    r = client.post(
        "/predict",
        content=json.dumps({**row, "mean area": float("nan")}),
        headers={**auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "mean area" in r.text
    r = client.post("/predict", json={**row, "extra": 1.0}, headers=auth)
    assert r.status_code == 422 and "extra" in r.text
    assert client.post("/predict", json=[], headers=auth).status_code == 422
    assert client.post("/predict", json=[row] * 200, headers=auth).status_code == 413
    assert client.post("/predict", json=row, headers=auth).status_code == 200  # still answering


def test_http_app_predict_route_answers_outside_fastapi_routing_like_a_route(http_client):
    """POST /predict skips Starlette's routing: its other answers are still HTTP's."""
    client, row = http_client
    auth = {"Authorization": "Bearer s3cret"}
    r = client.get("/predict", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = client.post(
        "/predict", content=json.dumps(row), headers={**auth, "Content-Type": "text/plain"}
    )
    assert r.status_code == 415
    chunked = (json.dumps(row).encode() for _ in range(1000))  # no content-length: read and cut
    assert client.post("/predict", content=chunked, headers=auth).status_code == 413
    r = client.post("/predict", content=b"{", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body"
    r = client.post("/predict", json=[row, {**row, "mean area": "big"}], headers=auth)
    assert r.status_code == 422 and [d["field"] for d in r.json()["detail"]] == ["1.mean area"]
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
    assert "mean area" in spec["components"]["schemas"]["Record"]["properties"]


def test_http_app_takes_categories_as_text(tmp_path):
    meta = {"name": "c", "version": 1, **tiny_categorical_model(tmp_path)}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    client = TestClient(build_http_app(Predictor.from_dir(str(tmp_path)), 20_000, None))
    r = client.post("/predict", json=[{"x": 1.0, "color": "red"}, {"x": 1.0, "color": "mauve"}])
    assert r.status_code == 200
    assert {p["label"] for p in r.json()["predictions"]} <= {"no", "yes"}
    r = client.post("/predict", json={"x": 1.0, "color": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "color"
    # null is a missing value: imputed as in training (x's fill is 0; color goes to unknown)
    missing = client.post("/predict", json={"x": None, "color": None}).json()["predictions"]
    filled = client.post("/predict", json={"x": 0.0, "color": "mauve"}).json()["predictions"]
    assert missing == filled
    assert client.post("/predict", json={"color": "red"}).status_code == 422  # absent: an error
    meta = client.get("/metadata").json()
    assert meta["inputs"] == {"numeric": ["x"], "categorical": ["color"]}
    # unknown_categories=reject: a category not seen in training is a 422 naming the column
    strict = TestClient(
        build_http_app(Predictor.from_dir(str(tmp_path)), 20_000, None, "c@1", "reject")
    )
    assert strict.post("/predict", json={"x": 1.0, "color": "red"}).status_code == 200
    r = strict.post("/predict", json={"x": 1.0, "color": "mauve"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "color"
    assert "'blue' or 'red'" in r.json()["detail"][0]["msg"]


def test_values_that_cannot_be_scored_get_a_422_or_a_reject_row_never_a_nan(tmp_path):
    """1e39 passes as a number but is beyond float32 once scaled (no clipping); a missing value
    in a column whose missing rows training dropped has no fill. Serve answers 422 naming the
    field, batch inference writes the row to its rejects with the reason, and no answer holds a
    NaN or a label made up from one."""
    from dcml import registry
    from dcml.scoring import BatchScorer
    from dcml.storage import Storage

    from .conftest import register_tiny_model

    meta = {"name": "c", "version": 1, **tiny_categorical_model(tmp_path)}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    client = TestClient(build_http_app(Predictor.from_dir(str(tmp_path)), 20_000, None))
    ok = {"x": 1.0, "color": "red"}
    r = client.post("/predict", json=[ok, {"x": 1e39, "color": "red"}])
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == "1.x" and error["loc"] == ["list[Record]", 1, "x"]
    assert "float32" in error["msg"]
    assert client.post("/predict", json=ok).status_code == 200  # and the server still answers

    # batch inference, with the model's x dropped (not imputed) where missing in training
    storage = Storage(str(tmp_path / "store"))
    ref = register_tiny_model(storage, tmp_path / "tiny", fill={"x": None})
    mv = registry.resolve_model(storage, ref)
    actor = BatchScorer(Predictor.from_storage(storage, mv.path), "id")
    batch = pa.table({"id": [1, 2, 3, 4], "x": [1.0, 1e39, None, -np.inf], "color": ["red"] * 4})
    scored, rejected = actor.score(batch)
    assert scored.column("id").to_pylist() == [1]
    assert np.isfinite(scored.column("probability").to_numpy()).all()
    assert rejected.to_pylist() == [
        {"id": 2, "field": "x", "reason": "too large in magnitude: beyond float32 once scaled"},
        {
            "id": 3,
            "field": "x",
            "reason": "missing, and rows missing it were dropped in training: send a number",
        },
        {"id": 4, "field": "x", "reason": "not a finite number"},
    ]
    assert actor.score(batch.slice(1, 1))[0].num_rows == 0  # all rejected: nothing scored
    # an unseen category: the unknown bucket, or with `serve.unknown_categories: reject` (what
    # Serve answers with a 422) a reject row; a missing one is still the unknown bucket
    colors = pa.table({"id": [5, 6, 7], "x": [1.0] * 3, "color": ["red", "mauve", None]})
    assert actor.score(colors)[0].column("id").to_pylist() == [5, 6, 7]
    strict = BatchScorer(
        Predictor.from_storage(storage, mv.path), "id", unknown_categories="reject"
    )
    scored, rejected = strict.score(colors)
    assert scored.column("id").to_pylist() == [5, 7]
    assert rejected.to_pylist() == [
        {"id": 6, "field": "color", "reason": "not a category seen in training: 'blue', 'red'"}
    ]
    assert actor.score(batch.slice(0, 0))[0].num_rows == 0  # no rows at all


def test_predict_without_ray_writes_ids_predictions_and_passthrough_in_input_order(tmp_path):
    """`dcml predict` with the local engine (no Ray): the output holds the id, the label and
    probability the Predictor answers, the model version and the passthrough columns, one file
    per input part in input order; rows that cannot be scored (a missing value whose rows
    training dropped, an infinite one, no id) are in _rejects/ with the reason. Splitting a file
    by its row groups, more threads and smaller batches change nothing; a CSV copy scores the
    same. A missing column names the file, a passthrough that would replace an output is refused."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from dcml import registry
    from dcml.batch import described, engine_for, predict_batch
    from dcml.data.errors import DataError
    from dcml.storage import Storage

    from .conftest import register_tiny_model

    storage = Storage(str(tmp_path / "store"))
    ref = register_tiny_model(storage, tmp_path / "tiny", fill={"x": None})
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    x[[4, 21]] = [np.nan, np.inf]
    rows = pa.table(
        {
            "id": pa.array([*range(17), None, *range(18, 30)], pa.int64()),
            "x": pa.array(x, from_pandas=True),  # NaN -> null: missing
            "color": rng.choice(["red", "blue", "green"], 30).tolist(),
            "segment": [f"s{i % 3}" for i in range(30)],
        }
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(rows.slice(0, 20), inputs / "a.parquet", row_group_size=4)  # 5 row groups
    pq.write_table(rows.slice(20), inputs / "b.parquet")

    def predict(out: str, source=inputs, **fields) -> dict:
        cfg = parse_config(
            {
                "storage": {"root": str(tmp_path / "store")},
                "predict": {"engine": "local", "passthrough": ["segment"], **fields},
            }
        )
        return predict_batch(cfg, "cat@latest", str(source), str(tmp_path / out))

    # 4 threads, 2 files: a.parquet in two parts (row groups 0-2 and 3-4), b.parquet whole
    manifest = predict("out", threads=4, batch_size=3)
    assert manifest["engine"] == "local" and manifest["threads"] == 3
    assert (manifest["rows"], manifest["rows_rejected"]) == (27, 3)
    parts = [f"part-0000{n}.parquet" for n in range(3)]
    assert sorted(f["path"].split("/", 1)[1] for f in manifest["files"]) == sorted(
        parts + [f"_rejects/{p}" for p in parts]  # rejects: ids 4; none; 21
    )
    out = pq.read_table(tmp_path / "out")  # `_rejects/` and `_manifest.json` are skipped
    assert out.column_names == ["id", "label", "probability", "model_version", "segment"]
    scored = rows.filter(pa.array([i not in (4, 17, 21) for i in range(30)]))
    assert out.column("id").to_pylist() == scored.column("id").to_pylist()  # input order
    assert out.column("segment").equals(scored.column("segment"))
    mv = registry.resolve_model(storage, ref)
    answers = Predictor.from_storage(storage, mv.path).predict_records(scored.to_pylist())
    assert out.column("label").to_pylist() == [a["label"] for a in answers]
    assert out.column("probability").to_pylist() == pytest.approx(
        [a["probability"] for a in answers], abs=1e-7
    )
    assert set(out.column("model_version").to_pylist()) == {ref}
    rejects = pq.read_table(tmp_path / "out" / manifest["prefix"] / "_rejects").to_pylist()
    assert sorted(rejects, key=lambda r: str(r["id"])) == [
        {"id": 21, "field": "x", "reason": "not a finite number"},
        {
            "id": 4,
            "field": "x",
            "reason": "missing, and rows missing it were dropped in training: send a number",
        },
        {"id": None, "field": "id", "reason": "no id: cannot be joined"},
    ]
    assert "27 predictions" in described(manifest, "out") and "3 rows could not" in described(
        manifest, "out"
    )

    # one thread, whole files, big batches: the same table, value for value
    assert predict("one", threads=1, batch_size=65_536)["threads"] == 1
    assert pq.read_table(tmp_path / "one").equals(out)
    # the same rows as CSV
    csv = tmp_path / "csv"
    csv.mkdir()
    pacsv.write_csv(rows, csv / "rows.csv")
    predict("from-csv", csv)
    from_csv = pq.read_table(tmp_path / "from-csv")
    assert from_csv.column("label").equals(out.column("label"))
    assert from_csv.column("probability").equals(out.column("probability"))

    # CSV as people write it: ids as text (kept as spelled), a blank id, a number that is not
    # one, an empty part file beside
    messy = tmp_path / "messy"
    messy.mkdir()
    (messy / "a.csv").write_text(
        "id,x,color,segment\n00123,1.5,red,s0\n,2.0,blue,s1\n7,abc,red,s2\n8,,red,s0\n"
    )
    (messy / "b.csv").write_text("")
    manifest = predict("from-messy", messy)
    assert (manifest["rows"], manifest["rows_rejected"]) == (1, 3)
    assert pq.read_table(tmp_path / "from-messy").column("id").to_pylist() == ["00123"]
    rejects = pq.read_table(tmp_path / "from-messy" / manifest["prefix"] / "_rejects")
    assert sorted(zip(*rejects.to_pydict().values(), strict=True)) == [
        ("", "id", "no id: cannot be joined"),
        ("7", "x", "not a number"),
        ("8", "x", "missing, and rows missing it were dropped in training: send a number"),
    ]

    pq.write_table(rows.drop_columns(["color"]), inputs / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'color'"):
        predict("bad")
    with pytest.raises(ValueError, match="predict.passthrough: label would replace"):
        predict("clash", passthrough=["label"])
    with pytest.raises(DataError, match=r"no column 'nope' \(listed in predict.passthrough\)"):
        predict("nope", source=inputs / "a.parquet", passthrough=["nope"])
    with pytest.raises(LookupError, match="no model named 'dog'.*models: cat"):
        predict_batch(parse_config({"storage": {"root": str(tmp_path / "store")}}), "dog@x", "", "")
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").rglob("*.parquet"))
    # auto: Ray Data where a cluster is named
    assert engine_for(parse_config({"cluster": {"address": "auto"}})) == "ray"


def test_a_near_constant_column_is_not_scaled_by_its_float_noise():
    from dcml.data.transforms import _scale

    noise = float(np.std(np.full(1000, 0.1) + np.random.default_rng(0).normal(0, 1e-17, 1000)))
    assert 0 < noise < 1e-15 and _scale(noise, 0.1) == 1.0  # constant: unscaled
    assert _scale(0.0, 0.0) == 1.0 and _scale(None, 1.0) == 1.0
    assert _scale(100.0, 1.7e9) == 100.0  # timestamps a few minutes apart: a real spread
    assert _scale(1e-20, 1e-19) == 1e-20  # tiny values, tiny spread: real too


def test_every_rank_keeps_its_own_slice_of_a_whole_split():
    """A small cached split comes whole to every DDP worker, which keeps its slice: for any
    world size the slices are disjoint, near-equal, in order, and together the split (read in
    batches of 8192, so slices cross batch boundaries)."""
    from dcml.train.ingest import cache_shard, collate_fn, slice_bounds
    from dcml.train.session import LocalSplit

    collate = collate_fn(["f"], "regression")
    for n in (3, 20_000):
        split = LocalSplit(pa.table({"f": np.arange(n, dtype=np.float64), "label": np.zeros(n)}))
        for world in range(1, 6):
            if n < world:
                continue
            kept = []
            for rank in range(world):
                bounds = slice_bounds(n, rank, world)
                x, _ = cache_shard(split, collate, torch.device("cpu"), "memory", rows=bounds)
                kept.append(x[:, 0].numpy().astype(np.int64))
            assert max(map(len, kept)) - min(map(len, kept)) <= 1, (n, world)
            assert (np.concatenate(kept) == np.arange(n)).all(), (n, world)
    # fewer rows than workers: refused before Ray is asked for anything
    from dcml.data.catalog import DatasetVersion
    from dcml.train.trainer import build_trainer

    tiny = DatasetVersion("d", "v", "/nowhere", {"rows": {"train": 3}})
    with pytest.raises(ValueError, match=r"the training split has 3 row\(s\) for train.workers=4"):
        build_trainer(parse_config({}), None, tiny, "run", workers=4)
    with pytest.raises(RuntimeError, match="shard is empty"):
        cache_shard(split, collate, torch.device("cpu"), "memory", rows=(5, 5))


def test_the_token_comes_from_the_environment_or_a_file_that_can_rotate(tmp_path, monkeypatch):
    from dcml.config import ConfigError, load_config
    from dcml.http_app import BearerToken, bearer_token

    meta = {"name": "c", "version": 1, **tiny_categorical_model(tmp_path)}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    record = {"x": 1.0, "color": "red"}

    def status(token: BearerToken, sent: str | None) -> int:
        app = build_http_app(Predictor.from_dir(str(tmp_path)), 20_000, token)
        headers = {"Authorization": f"Bearer {sent}"} if sent else {}
        return TestClient(app).post("/predict", json=record, headers=headers).status_code

    monkeypatch.setenv("DCML_TEST_TOKEN", "from-env")
    cfg = load_config(None, ["serve.auth_token_env=DCML_TEST_TOKEN"])
    from_env = bearer_token(cfg.serve)
    assert status(from_env, None) == 401 and status(from_env, "from-env") == 200
    monkeypatch.delenv("DCML_TEST_TOKEN")
    with pytest.raises(ValueError, match=r"serve.auth_token_env: \$DCML_TEST_TOKEN is not set"):
        bearer_token(cfg.serve)

    secret = tmp_path / "token"
    secret.write_text("first\n")
    token = BearerToken(file=str(secret), recheck_s=0)
    app = build_http_app(Predictor.from_dir(str(tmp_path)), 20_000, token)
    client = TestClient(app)
    ask = lambda t: client.post("/predict", json=record, headers={"Authorization": f"Bearer {t}"})  # noqa: E731
    assert ask("first").status_code == 200 and ask("second").status_code == 401
    secret.write_text("second")  # rotated: the running app takes the new one, not the old
    assert ask("second").status_code == 200 and ask("first").status_code == 401
    secret.unlink()  # gone mid-rotation: the last token stands
    assert ask("second").status_code == 200
    with pytest.raises(ConfigError, match="serve: give one of auth_token, auth_token_file"):
        load_config(None, ["serve.auth_token=x", "serve.auth_token_file=/etc/t"])
    # the token's value is never stored with a run or a model
    from dcml.config import public_dump

    fixed = load_config(None, ["serve.auth_token=s3cret-value"])
    dumped = json.dumps(public_dump(fixed))
    assert "s3cret-value" not in dumped
    # nor does it travel to Serve (whose status and dashboard show a deployment's arguments):
    # replicas get its digest, and check it
    from dcml.serving import ServeArgs, serve_args

    args = serve_args(fixed, "c@1")
    assert "s3cret-value" not in json.dumps(args) and args["auth_token_sha256"]
    hashed = bearer_token(ServeArgs.model_validate(args))
    assert status(hashed, "s3cret-value") == 200 and status(hashed, "s3cret") == 401
    # resuming a run stored with another token source takes the one given now, not both
    from dcml.config import parse_config, with_secrets

    stored = public_dump(cfg)  # auth_token_env
    assert parse_config(with_secrets(stored, fixed)).serve.auth_token == "s3cret-value"


def test_model_options_width_list_norm_residual():
    from dcml.config_model import ModelConfig
    from dcml.train.model import model_spec

    cfg = ModelConfig(depth=3, width=[16, 16, 8], norm="batch", residual=True, dropout=0.0)
    spec = model_spec(cfg, n_features=5, n_outputs=3)
    model = build_model(spec)
    assert model(torch.zeros(4, 5)).shape == (4, 3)
    blocks = list(model)[:3]
    assert [b.residual for b in blocks] == [False, True, False]  # only where widths match
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    with pytest.raises(ValueError, match="depth is 2"):
        ModelConfig(depth=2, width=[4])


def test_task_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, mean_absolute_error, r2_score

    from dcml.train.metrics import multiclass_metrics, regression_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet([1, 1, 1], 300)
    m = multiclass_metrics(y, proba)
    assert m["macro_f1"] == pytest.approx(f1_score(y, proba.argmax(1), average="macro"))
    t = rng.normal(size=300)
    pred = t + rng.normal(0, 0.3, 300)
    r = regression_metrics(t, pred)
    assert r["r2"] == pytest.approx(r2_score(t, pred))
    assert r["mae"] == pytest.approx(mean_absolute_error(t, pred))


def test_the_loop_learns_regression_and_multiclass_without_ray(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 2)).astype(np.float32)
    features = ["x0", "x1"]
    for task, y, classes, key, bar in [
        ("regression", (2 * x[:, 0] - x[:, 1]).astype(np.float32), None, "val_r2", 0.95),
        ("multiclass", ((x[:, 0] > 0) + 2 * (x[:, 1] > 0)), [0, 1, 2, 3], "val_accuracy", 0.9),
    ]:
        cfg = local_config(
            data={"task": task},
            model={"depth": 1, "width": 32, "dropout": 0.0},
            train={"optimizer": "adam", "lr": 0.01, "epochs": 30, "loss": "auto"},
        )
        if task == "regression":
            cfg.train.loss = "huber"
        data = {
            "train": table(x[:600], y[:600], features),
            "validation": table(x[600:], y[600:], features),
        }
        history = fit_local(cfg, data, str(tmp_path / task), features, task, classes)
        assert history[-1][key] > bar, (task, history[-1])


def test_schedules_and_early_stopping():
    from dcml.config_sections import TrainConfig
    from dcml.train.step import EarlyStop, lr_factor

    t = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    factors = [lr_factor(e, t) for e in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and factors[-1] < 0.1
    t = TrainConfig(epochs=10, schedule="step", step_size=3, gamma=0.5)
    assert [lr_factor(e, t) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]

    stop = EarlyStop("max", patience=2)
    assert [stop.update(v) for v in (0.5, 0.6, 0.59, 0.6, 0.58)] == [False] * 3 + [True] * 2
    assert "no improvement for 2 epochs" in stop.reason
    stop = EarlyStop("min", target=0.1)
    assert [stop.update(v) for v in (0.5, 0.2, 0.09)] == [False, False, True]


def test_step_options_accumulate_clip_l1_and_bf16_still_learn(tmp_path):
    t, features, pre, splits = _breast_cancer_xy()
    x = pre.transform({c: t.column(c).to_numpy() for c in features})
    y = t.column("label").to_numpy().astype(np.float32)
    tr, va = splits == "train", splits == "validation"
    data = {"train": table(x[tr], y[tr], features), "validation": table(x[va], y[va], features)}
    cfg = local_config(
        model={"depth": 1, "width": 16, "dropout": 0.0},
        train={
            "optimizer": "sgd",
            "lr": 0.05,
            "epochs": 40,
            "batch_size": 16,
            "grad_accum": 2,
            "grad_clip": 1.0,
            "l1": 1e-4,
            "precision": "bf16",
            "patience": 3,
        },
    )
    history = fit_local(cfg, data, str(tmp_path / "run"), features)
    assert history[-1]["val_roc_auc"] >= 0.97
    assert len(history) < 40  # early stopping ended it


def test_a_trial_ends_its_cosine_schedule_with_its_own_epoch_budget(tmp_path):
    """A sweep trains each trial for tune.epochs: the schedule must span those, not train.epochs."""
    from dcml.tune import trial_config

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    data = {
        "train": table(x[:150], y[:150], ["a", "b"]),
        "validation": table(x[150:], y[150:], ["a", "b"]),
    }
    sweep = local_config(train={"epochs": 20, "schedule": "cosine", "lr": 0.1}, tune={"epochs": 4})
    cfg = trial_config(sweep, {"train.lr": 0.2})
    assert (cfg.train.epochs, cfg.train.lr) == (4, 0.2)
    history = fit_local(cfg, data, str(tmp_path / "trial"), ["a", "b"])
    lrs = [h["lr"] for h in history]
    assert len(lrs) == 4 and lrs[0] == 0.2
    # the last epoch is at the end of the cosine: 0.5 * (1 + cos(pi * 3/4)) of the rate
    assert lrs[-1] == pytest.approx(0.2 * 0.5 * (1 + np.cos(np.pi * 3 / 4)))


def test_gpu_check_script_runs_without_ray(tmp_path):
    """benchmarks/gpu_check.py is what a GPU machine without Ray runs: keep it working (on CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    # `import ray` fails in this child, as on a GPU machine without Ray
    args = ["--device", "cpu", "--rows", "4000", "--epochs", "1", "--batch", "256"]
    args += ["--out", str(tmp_path / "model")]
    code = (
        "import sys, runpy; sys.modules['ray'] = None; "
        f"sys.argv = [{str(script)!r}, *{args!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bf16" in done.stdout and done.stdout.strip().endswith("OK")


HAPROXY_CFG = """global
    maxconn 100
defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
frontend prometheus
    bind :{metrics}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind *:{http}
    default_backend replicas
backend replicas
    server r1 127.0.0.1:30000
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
"""


def test_the_haproxy_wrapper_moves_only_the_stats_and_metrics_pages_to_loopback(tmp_path):
    """Serve writes `bind *:STATS` and `bind :METRICS` (all interfaces); the HAProxy that dcml
    has Serve run rewrites those two and nothing else (a serve.host of 0.0.0.0 is `bind *:PORT`
    too), and the real HAProxy accepts the result (`-c`: check the config)."""
    import subprocess

    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from dcml.cluster import _haproxy_binary, loopback_haproxy

    # the lines Serve's template writes for the two pages (a Ray upgrade that changes them fails)
    assert "bind :{{ config.metrics_port }}" in HAPROXY_CONFIG_TEMPLATE
    assert "bind *:{{ config.stats_port }}" in HAPROXY_CONFIG_TEMPLATE
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(metrics=9101, http=8404, stats=18404))
    wrapper = loopback_haproxy(str(tmp_path), _haproxy_binary(), ["18404", "9101"])
    checked = subprocess.run([wrapper, "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    binds = [line.strip() for line in config.read_text().splitlines() if "bind" in line]
    assert binds == ["bind 127.0.0.1:9101", "bind *:8404", "bind 127.0.0.1:18404"]
    config.unlink()  # a rewrite that fails stops the start
    failed = subprocess.run([wrapper, "-c", "-f", str(config)], capture_output=True, text=True)
    assert failed.returncode != 0 and "haproxy.cfg" in failed.stderr

    # at exit, an HAProxy (here a stand-in) still running from the state folder is stopped
    import sys
    import time
    from pathlib import Path

    from dcml.cluster import _remove_state

    other = subprocess.Popen(["sleep", "60"])
    left = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"{tmp_path}/x/haproxy.cfg"]
    )
    cmdline = Path(f"/proc/{left.pid}/cmdline")
    for _ in range(200):  # until it has exec'd: before that its command line is this process's
        if str(tmp_path).encode() in cmdline.read_bytes():
            break
        time.sleep(0.05)
    _remove_state(str(tmp_path))
    assert left.wait(timeout=10) == -15 and not tmp_path.exists()
    assert other.poll() is None  # not started from the folder: left alone
    other.kill()
    other.wait()


def test_decision_thresholds_are_the_best_on_the_given_split_by_each_policy():
    from dcml.train.metrics import binary_metrics, choose_threshold

    rng = np.random.default_rng(0)
    y = rng.random(3000) < 0.3
    p = np.clip(np.where(y, rng.normal(0.65, 0.2, 3000), rng.normal(0.35, 0.2, 3000)), 0, 1)
    grid = np.unique(p)

    def f1(t):
        return binary_metrics(y, p, t)["f1"]

    best = choose_threshold("max_f1", y, p)
    assert f1(best) == pytest.approx(max(f1(t) for t in grid))
    youden = choose_threshold("youden", y, p)
    j = [(p[y] >= t).mean() - (p[~y] >= t).mean() for t in (youden, *grid)]
    assert j[0] == pytest.approx(max(j))
    # a costly false negative lowers the threshold and raises recall
    cheap_fn, dear_fn = choose_threshold("cost", y, p, 1, 1), choose_threshold("cost", y, p, 1, 10)
    assert dear_fn < cheap_fn
    assert binary_metrics(y, p, dear_fn)["recall"] > binary_metrics(y, p, cheap_fn)["recall"]
    assert choose_threshold(0.3, y, p) == 0.3
    assert choose_threshold("max_f1", np.ones(5, bool), p[:5]) == 0.5  # one class: no choice
    # positives scored below negatives, false positives dear: answer none positive
    assert choose_threshold("cost", [1, 0, 0], [0.1, 0.8, 0.9], 100, 1) > 0.9
    # classes apart: of the perfect thresholds, the one nearest 0.5
    assert choose_threshold("max_f1", [0, 0, 1, 1], [0.1, 0.2, 0.9, 0.95]) == pytest.approx(0.55)
