"""Gradient-boosted trees on a real local Ray: data-parallel XGBoost on Ray Train, and after
training the MLP's path (registry, Predictor, batch prediction, report); their quality against
scikit-learn's HistGradientBoosting on the same split. (Serving a gbdt version over HTTP is in
test_serve, sweeps across both families in test_tune, the loop without Ray in test_gbdt_loop.)"""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from dcml.batch import predict_batch
from dcml.config import with_values
from dcml.data.catalog import read_split_numpy
from dcml.data.preprocess import preprocess
from dcml.data.synth import synth_table
from dcml.layout import BOOSTER, GAIN, WEIGHTS
from dcml.pipeline import raw_test_rows, stage_register, stage_train
from dcml.predictor import Predictor
from dcml.report import write_report
from dcml.storage import DamagedError, Storage
from dcml.train.gbdt import WHOLE
from dcml.train.metrics import roc_auc
from dcml.train.outputs import evaluate_checkpoint

from .conftest import make_config, preprocessed, quiet, trained_in_process, write_shards

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

TREES = {"family": "gbdt", "gbdt": {"rounds": 80, "checkpoint_every": 20}}


@pytest.fixture(scope="module")
def bc(tmp_path_factory):
    return preprocessed(tmp_path_factory.mktemp("gbdt") / "store")


def test_trees_train_on_two_xgboost_workers_and_serve_through_the_mlps_path(bc, tmp_path):
    root, dv = bc
    cfg = make_config(root, name="bct", model=TREES, train={"workers": 2, "threshold": "max_f1"})
    lines: list[str] = []
    _, outcome = stage_train(cfg, dv.ref, log=lines.append)
    assert "2 XGBoost worker(s), up to 80 rounds" in lines[0]
    best = outcome.metrics["best_round"]
    assert f"best checkpoint: round {best}" in lines[-1]
    assert outcome.test_metrics["test_roc_auc"] > 0.97
    run = root / "runs" / outcome.run_id
    history = (run / "history.csv").read_text().splitlines()
    assert "round" in history[0] and len(history) - 1 >= best  # a row per round run
    # the two workers built one model from both halves of the split: the last round's training
    # loss (XGBoost's, over the workers) is the whole booster's log loss on the whole split
    storage = Storage.from_config(cfg)
    last = max(p for p in run.glob("checkpoint_*") if p.is_dir())  # named by time
    booster = xgb.Booster()
    booster.load_model(str(last / WHOLE if (last / WHOLE).exists() else last / BOOSTER))
    _, x_train, y_train = read_split_numpy(storage, dv, "train")
    p = np.clip(booster.inplace_predict(x_train), 1e-7, 1 - 1e-7)
    log_loss = -np.mean(y_train * np.log(p) + (1 - y_train) * np.log(1 - p))
    head, *rows = history
    assert float(rows[-1].split(",")[head.split(",").index("train_loss")]) == pytest.approx(
        log_loss, rel=1e-4
    )
    gain = json.loads((run / GAIN).read_text())
    assert set(gain) == set(dv.preprocessor.inputs) and sum(gain.values()) == pytest.approx(1)
    plots = {p.name for p in (run / "plots").iterdir()}
    assert {"gain_importance.png", "feature_importance.png", "learning_curves.png"} <= plots

    mv = stage_register(cfg, dv, outcome.checkpoint_path, {"run_id": outcome.run_id}, [], quiet)
    version = Path(mv.path)
    assert (version / BOOSTER).exists() and not (version / WEIGHTS).exists()
    spec = mv.meta["model_spec"]
    assert spec["kind"] == "gbdt" and spec["rounds"] == best
    assert mv.meta["threshold_policy"] == "max_f1" and 0 < mv.meta["threshold"] < 1
    assert [f["path"] for f in mv.meta["files"]] == [BOOSTER]

    # raw records through the Predictor get the booster's probabilities of the stored test
    # split's features, labelled by the stored threshold
    predictor = Predictor.from_storage(storage, mv.path)
    rows = raw_test_rows(cfg, dv, limit=30).to_pylist()
    answers = predictor.predict_records([{c: r[c] for c in dv.preprocessor.inputs} for r in rows])
    booster = xgb.Booster()
    booster.load_model(str(version / BOOSTER))
    ids, x_test, _ = read_split_numpy(storage, dv, "test")
    at = {int(i): k for k, i in enumerate(ids)}
    own = booster.inplace_predict(x_test[[at[int(r["id"])] for r in rows]])
    assert [a["probability"] for a in answers] == pytest.approx(own.tolist(), abs=1e-6)
    threshold = mv.meta["threshold"]
    assert [a["label"] for a in answers] == [int(p >= threshold) for p in own]
    # a booster altered after registration is refused, as altered weights are
    stored = (version / BOOSTER).read_bytes()
    (version / BOOSTER).write_bytes(stored[:-1] + bytes([stored[-1] ^ 1]))
    with pytest.raises(DamagedError, match=BOOSTER):
        Predictor.from_storage(storage, mv.path)
    (version / BOOSTER).write_bytes(stored)
    # batch prediction: the same answers
    pq.write_table(raw_test_rows(cfg, dv, limit=30), tmp_path / "raw.parquet")
    local = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"engine": "local"})})
    predict_batch(local, mv.ref, str(tmp_path / "raw.parquet"), str(tmp_path / "scored"))
    scored = {r["id"]: r for r in pq.read_table(tmp_path / "scored").to_pylist()}
    assert [scored[r["id"]]["probability"] for r in rows] == pytest.approx(own.tolist(), abs=1e-6)

    page = Path(write_report(storage, outcome.run_id, model=mv)).read_text()
    assert "Gain importance" in page and "boosting round" in page
    assert "batch_size" not in page  # the MLP's fields are not a gbdt run's


def hist_gradient_boosting_auc(storage, dv) -> float:
    """scikit-learn's HistGradientBoosting with its defaults, on the same features and split."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    _, x, y = read_split_numpy(storage, dv, "train")
    _, x_test, y_test = read_split_numpy(storage, dv, "test")
    model = HistGradientBoostingClassifier(random_state=0).fit(x, y)
    return roc_auc(y_test, model.predict_proba(x_test)[:, 1])


@pytest.mark.parametrize("data", ["breast_cancer", "synthetic"])
def test_trees_are_within_one_percent_of_hist_gradient_boosting(bc, tmp_path, data):
    if data == "breast_cancer":
        root, dv = bc
        cfg = make_config(root, model=TREES)
    else:
        write_shards(tmp_path / "raw", synth_table(12_000, 0, 0), 2)
        cfg = make_config(
            tmp_path / "store", data={"name": "syn", "source": str(tmp_path / "raw")}, model=TREES
        )
        dv = preprocess(cfg, Storage.from_config(cfg), log=quiet)
    cfg = with_values(cfg, {"model.gbdt.rounds": 300})
    checkpoint = trained_in_process(cfg, dv, tmp_path / "run")
    storage = Storage.from_config(cfg)
    ours = evaluate_checkpoint(storage, dv, checkpoint, "test")[0]["roc_auc"]
    theirs = hist_gradient_boosting_auc(storage, dv)
    assert ours >= 0.99 * theirs, (ours, theirs)
    assert np.isfinite(ours) and ours > 0.8
