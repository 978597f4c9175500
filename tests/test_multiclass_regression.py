"""Multiclass and regression through preprocess, Ray Train (DDP), registration and the predictor."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dcml.pipeline import raw_test_rows, stage_register, stage_train
from dcml.predictor import Predictor
from dcml.report import write_report
from dcml.storage import Storage

from .conftest import make_config, run, write_shards

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def table(n: int = 1500, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=n), rng.normal(size=n)
    quadrant = np.array(["ne", "nw", "se", "sw"])[(f1 < 0).astype(int) + 2 * (f2 < 0)]
    return pa.table(
        {
            "id": np.arange(n),
            "f1": f1,
            "f2": f2,
            "shade": rng.choice(["dark", "light"], n),
            "kind": quadrant,
            "target": 2 * f1 - f2 + rng.normal(0, 0.1, n),
        }
    )


def train_and_register(tmp_path, name, task, label, workers, **train):
    dv, storage = run(tmp_path, name=name, task=task, label=label, numeric=["f1", "f2"])
    cfg = make_config(
        tmp_path / "store",
        name=name,
        data={"name": name, "task": task, "label": label},
        model={"depth": 2, "width": [32, 32], "norm": "layer", "residual": True, "dropout": 0.0},
        train={"workers": workers, "epochs": 12, "batch_size": 32, "lr": 0.01, **train},
    )
    _, outcome = stage_train(cfg, dv.ref, log=lambda _: None)
    mv = stage_register(cfg, dv, outcome.checkpoint_path, {"run_id": outcome.run_id}, [])
    return cfg, dv, mv, Storage.from_config(cfg), outcome


def test_multiclass_trains_with_ddp_and_predicts_class_names(tmp_path):
    write_shards(tmp_path / "raw", table(), 3)
    cfg, dv, mv, storage, _ = train_and_register(tmp_path, "quad", "multiclass", "kind", workers=2)
    assert cfg.train.metric == "val_macro_f1" and cfg.train.mode == "max"
    assert dv.manifest["classes"] == ["ne", "nw", "se", "sw"]
    assert mv.meta["model_spec"]["n_outputs"] == 4
    assert mv.meta["metrics"]["test_accuracy"] > 0.85
    assert mv.meta["metrics"]["test_macro_f1"] > 0.85
    shares = mv.meta["reference_predictions"]["frequencies"]  # of the predicted classes
    # the report's plots of a multiclass run: its confusion matrix and per-class scores
    plots = storage.ls(storage.path("runs", mv.meta["lineage"]["run_id"], "plots"))
    expected = ["confusion_matrix.png", "feature_importance.png", "learning_curves.png"]
    assert plots == [*expected, "per_class.png"]
    assert set(shares) == set(dv.manifest["classes"]) and sum(shares.values()) == pytest.approx(1)

    rows = raw_test_rows(cfg, dv, limit=50).to_pylist()
    answers = Predictor.from_storage(storage, mv.path).predict_records(rows)
    assert {a["label"] for a in answers} <= set(dv.manifest["classes"])
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-4 for a in answers)
    right = np.mean(
        [a["label"] == dv.manifest["classes"][r["label"]] for a, r in zip(answers, rows)]
    )
    assert right > 0.8

    # batch prediction: the label, its probability and one column per class
    out = scored(cfg, mv, tmp_path)
    classes = [f"probability_{c}" for c in dv.manifest["classes"]]
    assert out.column_names == ["id", "label", "probability", *classes, "model_version"]
    by_id = {r["id"]: r for r in out.to_pylist()}
    for r, a in zip(rows, answers):
        got = by_id[r["id"]]
        assert got["label"] == a["label"]
        assert [got[c] for c in classes] == pytest.approx(list(a["probabilities"].values()))


def test_regression_trains_and_predicts_values(tmp_path):
    write_shards(tmp_path / "raw", table(seed=1), 2)
    cfg, dv, mv, storage, outcome = train_and_register(
        tmp_path,
        "reg",
        "regression",
        "target",
        workers=1,
        cache="none",  # streamed from Ray Data every epoch, learning from scratch
        epochs=40,
        target=0.3,
        schedule="cosine",
        warmup_epochs=1,
        loss="huber",
    )
    assert cfg.train.metric == "val_rmse" and cfg.train.mode == "min"
    # "training done?": the target metric value ended the run before its 40 epochs
    assert outcome.metrics["val_rmse"] <= 0.3 and outcome.metrics["epoch"] < 39
    # the run's history: one row per epoch run, with the losses, metrics and learning rate
    history = (tmp_path / "store" / "runs" / outcome.run_id / "history.csv").read_text()
    lines = history.strip().splitlines()
    assert {"epoch", "train_loss", "val_rmse", "val_r2", "lr"} <= set(lines[0].split(","))
    assert len(lines) - 1 == outcome.metrics["epoch"] + 1
    assert mv.meta["metrics"]["test_r2"] > 0.9
    assert mv.meta["reference_predictions"]["kind"] == "value"
    # a regression run's report shows its own errors, not a ROC curve or confusion matrix
    assert sorted(
        p.name for p in (tmp_path / "store" / "runs" / outcome.run_id / "plots").iterdir()
    ) == [
        "feature_importance.png",
        "learning_curves.png",
        "predicted_vs_true.png",
        "residuals.png",
    ]
    page = Path(write_report(storage, outcome.run_id)).read_text()
    assert "Residuals (test split)" in page and "ROC curve" not in page
    rows = raw_test_rows(cfg, dv, limit=50).to_pylist()
    answers = Predictor.from_storage(storage, mv.path).predict_records(rows)
    err = np.array([a["value"] for a in answers]) - np.array([r["label"] for r in rows])
    assert np.sqrt((err**2).mean()) < 0.5
    out = scored(cfg, mv, tmp_path)
    assert out.column_names == ["id", "value", "model_version"]
    by_id = dict(zip(out.column("id").to_pylist(), out.column("value").to_pylist()))
    assert [by_id[r["id"]] for r in rows] == pytest.approx([a["value"] for a in answers])


def scored(cfg, mv, tmp_path) -> pa.Table:
    """`dcml predict` (the local engine) over the raw shards: the predictions table."""
    import pyarrow.parquet as pq

    from dcml.batch import predict_batch

    cfg = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"engine": "local"})})
    manifest = predict_batch(cfg, mv.ref, str(tmp_path / "raw"), str(tmp_path / "scored"))
    assert manifest["rows"] == 1500 and manifest["rows_rejected"] == 0
    return pq.read_table(tmp_path / "scored")
