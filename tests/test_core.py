"""What runs without Ray: splits, transforms, metrics, the loop, the predictor, the HTTP app."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score

from dcml.data.sources import breast_cancer_table
from dcml.data.split import assign_splits
from dcml.data.transforms import Preprocessor
from dcml.predictor import Predictor
from dcml.serving import build_http_app
from dcml.train.loop import fit_in_process, load_checkpoint, make_optimizer, save_checkpoint
from dcml.train.metrics import binary_metrics, roc_auc
from dcml.train.model import build_model

FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}


def test_split_is_a_function_of_the_id_alone():
    ids = np.arange(10_000)
    whole = assign_splits(ids, seed=0, fractions=FRACTIONS)
    # shuffled and chunked differently (another shard layout), the same id gets the same split
    perm = np.random.default_rng(1).permutation(ids)
    parts = np.concatenate([assign_splits(c, 0, FRACTIONS) for c in np.array_split(perm, 7)])
    assert (parts == whole[perm]).all()
    counts = {s: (whole == s).mean() for s in FRACTIONS}
    assert abs(counts["train"] - 0.7) < 0.02 and abs(counts["test"] - 0.15) < 0.02
    assert (assign_splits(ids, seed=1, fractions=FRACTIONS) != whole).any()


def test_roc_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.5 + y * 0.3, 2)  # rounded: many ties
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    m = binary_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6]))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5


def test_preprocessor_state_is_json_and_imputes_then_scales():
    pre = Preprocessor(
        ["a", "b"],
        fill={"a": 1.0, "b": 0.0},
        center={"a": 1.0, "b": 2.0},
        scale={"a": 2.0, "b": 1.0},
    )
    state = json.loads(json.dumps(pre.to_json()))
    again = Preprocessor.from_json(state)
    x = again.transform({"a": pa.array([3.0, None]), "b": np.array([2.0, 5.0])})
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[1.0, 0.0], [0.0, 3.0]])


def _breast_cancer_xy():
    t = breast_cancer_table()
    features = [c for c in t.column_names if c not in ("id", "label")]
    x = np.stack([t.column(c).to_numpy() for c in features], 1)
    splits = assign_splits(t.column("id").to_numpy(), 0, FRACTIONS)
    train = splits == "train"
    mean, std = x[train].mean(0), x[train].std(0)
    pre = Preprocessor(
        features, dict(zip(features, mean)), dict(zip(features, mean)), dict(zip(features, std))
    )
    return t, features, pre, splits


def test_loop_runs_without_ray_and_learns_logistic_regression(tmp_path):
    t, features, pre, splits = _breast_cancer_xy()
    cols = {c: t.column(c).to_numpy() for c in features}
    x, y = pre.transform(cols), t.column("label").to_numpy().astype(np.float32)
    torch.manual_seed(0)
    spec = {
        "kind": "mlp",
        "n_features": len(features),
        "n_outputs": 1,
        "depth": 0,
        "width": 1,
        "activation": "relu",
        "dropout": 0.0,
    }
    model = build_model(spec)  # depth 0: sigmoid(θᵀx), the seed's logistic regression
    opt = make_optimizer(model, "sgd", 0.05, 0.0)
    tr, va = splits == "train", splits == "validation"
    history = fit_in_process(model, (x[tr], y[tr]), (x[va], y[va]), 15, 32, opt, seed=0)
    assert len(history) == 15 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_roc_auc"] >= 0.98

    # a checkpoint round-trips without pickle, and the predictor reproduces the model
    save_checkpoint(str(tmp_path), model, opt, 14, {"model_spec": spec})
    fresh = build_model(spec)
    assert load_checkpoint(str(tmp_path), fresh, make_optimizer(fresh, "sgd", 0.05, 0.0)) == 15
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
