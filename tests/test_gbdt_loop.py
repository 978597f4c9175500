"""Gradient-boosted trees without Ray: the round loop, its checkpoints (no pickle), resuming a
killed run, early stopping at the best round, and the three tasks."""

import json

import numpy as np
import pyarrow as pa
import pytest
import xgboost as xgb

from dcml.config import ConfigError, load_config
from dcml.layout import BOOSTER, META
from dcml.train.gbdt import STATE, WHOLE
from dcml.train.loop import fit_local
from dcml.train.model import model_from_bytes
from dcml.train.session import LocalSession
from dcml.train.step import predict

FEATURES = ["f0", "f1", "f2", "f3"]


def splits(
    task: str = "binary", rows: int = 2000, seed: int = 0, shift: float = 0.0
) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", rows), ("validation", rows // 4)):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        signal = x[:, 0] + x[:, 1] * x[:, 2] + 0.5 * rng.normal(size=n)
        if task == "binary":
            y = (signal > 0).astype(np.int64)
        elif task == "multiclass":  # four quadrants
            y = ((x[:, 0] < 0).astype(np.int64) + 2 * (x[:, 1] < 0)).astype(np.int64)
        else:  # a value away from 0, as prices and durations are
            y = (signal + shift).astype(np.float32)
        out[name] = pa.table({"id": np.arange(n), "label": y, **dict(zip(FEATURES, x.T))})
    return out


def trees(*overrides: str, task: str = "binary"):
    return load_config(None, ["model.family=gbdt", f"data.task={task}", "seed=3", *overrides])


class Killed(Exception):
    pass


class KilledAfter(LocalSession):
    """A session whose process dies right after its `n`th checkpoint is stored."""

    def __init__(self, n: int, *args):
        super().__init__(*args)
        self.n = n

    def report(self, metrics, directory=None):
        super().report(metrics, directory)
        if directory and len(self.checkpoints()) == self.n:
            raise Killed


def last_checkpoint(folder) -> tuple[dict, xgb.Booster, list[str]]:
    path = sorted(folder.glob("checkpoint_*"))[-1]
    booster = xgb.Booster()
    booster.load_model(str(path / BOOSTER))
    return json.loads((path / META).read_text()), booster, sorted(p.name for p in path.iterdir())


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_trees(tmp_path):
    from dcml.train.gbdt import gbdt_train_func

    data = splits()
    cfg = trees("model.gbdt.rounds=40", "model.gbdt.early_stopping_rounds=0")
    whole = fit_local(cfg, data, str(tmp_path / "whole"), FEATURES)
    assert [r["round"] for r in whole] == [10, 20, 30, 40]  # a report every checkpoint_every

    config = {"cfg": cfg, "features": FEATURES, "task": "binary", "classes": [0, 1]}
    config |= {"class_weights": None, "progress": False}
    with pytest.raises(Killed):  # dies after round 20's checkpoint
        gbdt_train_func(config, KilledAfter(2, data, str(tmp_path / "killed")))
    resumed = fit_local(cfg, data, str(tmp_path / "killed"), FEATURES)
    assert [r["round"] for r in resumed] == [30, 40]  # went on from round 20, not from 0

    meta_a, booster_a, files = last_checkpoint(tmp_path / "whole")
    meta_b, booster_b, _ = last_checkpoint(tmp_path / "killed")
    assert booster_a.num_boosted_rounds() == booster_b.num_boosted_rounds()
    x = data["validation"].select(FEATURES).to_pandas().to_numpy()
    assert np.array_equal(booster_a.inplace_predict(x), booster_b.inplace_predict(x))
    assert meta_a["metrics"]["val_roc_auc"] == meta_b["metrics"]["val_roc_auc"]
    # the history of a resumed run holds every round once
    history = (sorted((tmp_path / "killed").glob("checkpoint_*"))[-1] / "history.csv").read_text()
    assert [float(line.split(",")[0]) for line in history.splitlines()[1:]] == list(range(40))
    # nothing in a checkpoint is a pickle: XGBoost's UBJSON, JSON and CSV
    assert set(files) <= {BOOSTER, WHOLE, META, STATE, "history.csv"}
    best = meta_a["metrics"]["best_round"]
    assert meta_a["model_spec"]["kind"] == "gbdt" and meta_a["model_spec"]["rounds"] == best
    assert (WHOLE in files) == (best < 40)


def test_early_stopping_keeps_the_trees_of_the_best_round(tmp_path):
    # deep trees at a high rate on noisy labels: validation loss is best early, then worsens
    cfg = trees(
        "model.gbdt.rounds=300",
        "model.gbdt.eta=0.5",
        "model.gbdt.max_depth=8",
        "model.gbdt.early_stopping_rounds=5",
        "model.gbdt.checkpoint_every=7",
        "train.metric=val_loss",
    )
    reported = fit_local(cfg, splits(rows=600), str(tmp_path), FEATURES)
    meta, booster, files = last_checkpoint(tmp_path)
    best, last = meta["metrics"]["best_round"], meta["metrics"]["round"]
    assert last < 300 and last == best + 5  # stopped 5 rounds after its best
    assert reported[-1]["round"] == last  # the stop is reported though not a multiple of 7
    # the model kept ends at its best round; the whole booster stays for a resume
    assert booster.num_boosted_rounds() == best == meta["model_spec"]["rounds"]
    assert WHOLE in files
    whole = xgb.Booster()
    whole.load_model(str(sorted(tmp_path.glob("checkpoint_*"))[-1] / WHOLE))
    assert whole.num_boosted_rounds() == last
    # its reported metrics are the best round's, which is the least validation loss of any round
    history = sorted(tmp_path.glob("checkpoint_*"))[-1] / "history.csv"
    lines = history.read_text().splitlines()
    head = lines[0].split(",")
    losses = [float(line.split(",")[head.index("val_loss")]) for line in lines[1:]]
    assert meta["metrics"]["val_loss"] == pytest.approx(min(losses)) == losses[best - 1]


def test_a_resumed_run_stops_where_an_unbroken_one_does_and_keeps_the_best_by_the_metric(
    tmp_path,
):
    """Early stopping's state survives a kill; with min_delta, the kept round is still the one
    with the best metric (min_delta only decides when to stop)."""
    from dcml.train.gbdt import gbdt_train_func

    data = splits(rows=600)
    cfg = trees(
        "model.gbdt.rounds=300",
        "model.gbdt.eta=0.3",
        "model.gbdt.early_stopping_rounds=8",
        "model.gbdt.checkpoint_every=5",
        "train.metric=val_loss",
        "train.min_delta=0.002",
    )
    whole = fit_local(cfg, data, str(tmp_path / "whole"), FEATURES)
    config = {"cfg": cfg, "features": FEATURES, "task": "binary", "classes": [0, 1]}
    config |= {"class_weights": None, "progress": False}
    with pytest.raises(Killed):
        gbdt_train_func(config, KilledAfter(3, data, str(tmp_path / "killed")))
    resumed = fit_local(cfg, data, str(tmp_path / "killed"), FEATURES)
    assert resumed[-1]["round"] == whole[-1]["round"] > 15  # stopped at the same round
    assert resumed[-1]["best_round"] == whole[-1]["best_round"]
    history = (sorted((tmp_path / "whole").glob("checkpoint_*"))[-1] / "history.csv").read_text()
    head, *lines = history.splitlines()
    losses = [float(line.split(",")[head.split(",").index("val_loss")]) for line in lines]
    assert whole[-1]["best_round"] == int(np.argmin(losses)) + 1


def test_an_undefined_validation_metric_stops_training_naming_it(tmp_path):
    data = splits()
    one_class = data["validation"].set_column(
        1, "label", pa.array(np.ones(data["validation"].num_rows, dtype=np.int64))
    )
    with pytest.raises(ValueError, match="train.metric=val_roc_auc is nan"):
        fit_local(
            trees("model.gbdt.stop_on=metric"),
            {**data, "validation": one_class},
            str(tmp_path),
            FEATURES,
        )


@pytest.mark.parametrize("task", ["multiclass", "regression", "huber"])
def test_multiclass_and_regression_trees_score_through_the_mlps_interface(tmp_path, task):
    loss = ["train.loss=huber"] if task == "huber" else []
    task = "regression" if task == "huber" else task
    data = splits(task, shift=50.0 if loss else 0.0)
    classes = ["ne", "nw", "se", "sw"] if task == "multiclass" else None
    cfg = trees("model.gbdt.rounds=60", *loss, task=task)
    reported = fit_local(cfg, data, str(tmp_path), FEATURES, task, classes)
    meta, _, _ = last_checkpoint(tmp_path)
    data_bytes = (sorted(tmp_path.glob("checkpoint_*"))[-1] / BOOSTER).read_bytes()
    model = model_from_bytes(meta["model_spec"], data_bytes)
    x = data["validation"].select(FEATURES).to_pandas().to_numpy().astype(np.float32)
    import torch

    out = predict(model, torch.as_tensor(x), task)
    y = data["validation"].column("label").to_numpy()
    if task == "multiclass":
        assert reported[-1]["val_accuracy"] > 0.95 and out.shape == (len(x), 4)
        assert np.mean(out.argmax(axis=1) == y) == pytest.approx(reported[-1]["val_accuracy"])
    else:
        # huber's labels sit near 50: XGBoost's own first guess there never recovers
        assert reported[-1]["val_r2"] > 0.6 and out.shape == (len(x),)
        assert 1 - np.mean((out - y) ** 2) / np.var(y) == pytest.approx(
            reported[-1]["val_r2"], abs=1e-4
        )


def test_config_refuses_what_trees_cannot_do():
    with pytest.raises(ConfigError, match="train.init_from"):
        trees("train.init_from=bc@1")
    with pytest.raises(ConfigError, match="tune.scheduler: PBT"):
        trees("tune.scheduler=pbt", "tune.space={train.lr: {choice: [0.1]}}")
    with pytest.raises(ConfigError, match="model.gbdt.checkpoint_every"):
        trees("tune.space={model.gbdt.checkpoint_every: {choice: [5]}}")
    with pytest.raises(ConfigError, match="did you mean 'reg_lambda'"):
        trees("model.gbdt.reg_lamda=2")
    with pytest.raises(ConfigError, match="train.init_from"):  # a sweep's trees cannot either
        load_config(
            None, ["train.init_from=bc@1", "tune.space={model.family: {grid: [mlp, gbdt]}}"]
        )
    # each family sweeps its own fields by default
    assert set(trees().tune.space) == {"model.gbdt.eta", "model.gbdt.max_depth"}
    assert set(load_config(None).tune.space) == {"train.lr", "model.depth"}
    # a space the family does not read would run one trial again and again
    from dcml.config_model import sweep_problem

    assert "a gbdt trial reads none of train.lr" in sweep_problem(
        {"train.lr": {"loguniform": [0.001, 0.1]}}, "gbdt"
    )
    assert sweep_problem({"model.family": {"choice": ["mlp", "gbdt"]}}, "mlp") is None
    # the family and its parameters can be swept
    cfg = trees("tune.space={model.family: {choice: [mlp, gbdt]}, model.gbdt.eta: {choice: [0.1]}}")
    assert set(cfg.tune.space) == {"model.family", "model.gbdt.eta"}
