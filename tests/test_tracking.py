"""MLflow tracking against a real `mlflow server` (SQLite backend, a free port): a training run,
a sweep and registrations mirrored and read back with MlflowClient; an unreachable server and a
missing mlflow cost one warning each, never the run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from mlflow.tracking import MlflowClient

from dcml import tracking
from dcml.cli import main
from dcml.config import with_values
from dcml.layout import HISTORY, run_folder
from dcml.pipeline import stage_register, stage_train, stage_tune
from dcml.report import write_report
from dcml.storage import Storage
from tests.conftest import PNG, free_port, make_config, preprocessed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
EXPERIMENT = "dcml-tracking-test"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` in a process group of its own: its URL (not yet waited for)."""
    folder = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            url.rsplit(":", 1)[1],
            "--workers",
            "1",
        ],
        stdout=open(folder / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # the server's job runner (GenAI jobs) is not needed here, and needs huey
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    yield SimpleNamespace(url=url, proc=proc, log=folder / "server.log")
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def wait_healthy(server) -> None:
    for _ in range(600):
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        try:
            if requests.get(f"{server.url}/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"mlflow server not healthy: {server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, mlflow_server):
    """A 2-epoch training run, a 2-trial ASHA sweep whose second trial (a learning rate that
    barely moves the weights) is stopped at the first rung, and both registered, all tracked."""
    root, dv = preprocessed(tmp_path_factory.mktemp("tracking") / "store")
    wait_healthy(mlflow_server)  # started before preprocessing, ready by now
    cfg = make_config(
        root,
        name="bcml",
        train={"epochs": 2, "workers": 1},
        model={"depth": 1, "width": 8},
        tune={
            "space": {"train.lr": {"grid": [3e-2, 1e-9]}},
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "epochs": 2,
            "num_samples": 1,
            "max_concurrent_trials": 1,  # in grid order: the bad trial meets the good one's rung
        },
        tracking={"mlflow_uri": mlflow_server.url, "experiment": EXPERIMENT},
    )
    lines: list[str] = []
    _, trained = stage_train(cfg, dv.ref, run_id="tracked-train", log=lines.append)
    _, swept = stage_tune(cfg, dv.ref, sweep_id="tracked-sweep", log=lines.append)
    first = stage_register(
        cfg, dv, trained.checkpoint_path, {"run_id": "tracked-train"}, ["production"], lines.append
    )
    lineage = {"sweep_id": "tracked-sweep", "params": swept.params}
    second = stage_register(cfg, dv, swept.checkpoint_path, lineage, [], lines.append)
    client = MlflowClient(mlflow_server.url)
    return SimpleNamespace(
        cfg=cfg,
        dv=dv,
        root=root,
        storage=Storage.from_config(cfg),
        trained=trained,
        swept=swept,
        models=(first, second),
        lines=lines,
        client=client,
        experiment=client.get_experiment_by_name(EXPERIMENT).experiment_id,
    )


def run_of(t, run_id: str):
    found = t.client.search_runs([t.experiment], f"tags.`dcml.run_id` = '{run_id}'")
    assert len(found) == 1, found
    return found[0]


def test_a_training_run_logs_config_epochs_test_metrics_plots_and_lineage(tracked, tmp_path):
    t = tracked
    assert not [line for line in t.lines if line.startswith("warning")]
    run = run_of(t, "tracked-train")
    page = f"{t.cfg.tracking.mlflow_uri}/#/experiments/{t.experiment}/runs/{run.info.run_id}"
    assert f"tracked in MLflow: {page}" in t.lines
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-train"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.width"] == "8"
    assert params["train.lr"] == str(t.cfg.train.lr) and params["name"] == "bcml"
    assert params["tune.space.train.lr.grid"] == "[0.03, 1e-09]"
    assert "serve.auth_token" not in params and "tracking.mlflow_uri" not in params
    # every epoch's metrics, the epoch (from 1) as step, as history.csv has them
    folder = Path(run_folder(t.storage, "tracked-train"))
    rows = list(csv.DictReader((folder / HISTORY).open()))
    for key in ("val_roc_auc", "train_loss", "lr"):
        history = sorted(t.client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows])
    for key, value in t.trained.test_metrics.items():  # test_accuracy, test_roc_auc, ...
        assert run.data.metrics[key] == pytest.approx(value)
    metric = t.cfg.train.metric
    assert run.data.metrics[f"best_{metric}"] == pytest.approx(t.trained.metrics[metric])
    assert run.data.metrics["best_epoch"] == t.trained.metrics["epoch"] + 1
    tags = run.data.tags
    assert tags["dcml.dataset"] == t.dv.ref and tags["dcml.kind"] == "train"
    assert tags["dcml.model_version"] == "bcml@1" and tags["dcml.aliases"] == "production"
    # artifacts: the history, test metrics and plots, as the run stored them
    names = {a.path for a in t.client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "test_metrics.json", "plots"} <= names
    plots = {a.path for a in t.client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/roc_curve.png"} <= plots
    local = t.client.download_artifacts(run.info.run_id, "plots/roc_curve.png", str(tmp_path))
    assert Path(local).read_bytes() == (folder / "plots" / "roc_curve.png").read_bytes()
    assert Path(local).read_bytes().startswith(PNG)


def test_a_sweep_is_a_parent_run_with_a_child_per_trial_and_the_stopped_one_marked(tracked):
    t = tracked
    parent = run_of(t, "tracked-sweep")
    assert parent.data.tags["dcml.kind"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.params["tune.scheduler"] == "asha"
    assert parent.data.tags["dcml.model_version"] == "bcml@2"
    assert "dcml.aliases" not in parent.data.tags  # registered without an alias
    names = {a.path for a in t.client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "plots"} <= names
    children = t.client.search_runs(
        [t.experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_trial = {c.data.tags["dcml.trial"]: c for c in children}
    assert set(by_trial) == {row["trial"] for row in t.swept.trials}
    metric = t.cfg.train.metric
    for row in t.swept.trials:
        child = by_trial[row["trial"]]
        assert child.data.params == {"train.lr": str(row["train.lr"])}
        steps = [m.step for m in t.client.get_metric_history(child.info.run_id, metric)]
        assert sorted(steps) == list(range(1, row["epochs"] + 1))
        assert child.data.metrics[f"best_{metric}"] == pytest.approx(row[metric])
    good, bad = by_trial[t.swept.trials[0]["trial"]], by_trial[t.swept.trials[1]["trial"]]
    assert [r["status"] for r in t.swept.trials] == ["finished", "stopped early"]
    assert good.info.status == "FINISHED" and good.data.tags["dcml.stopped_early"] == "false"
    assert bad.info.status == "KILLED" and bad.data.tags["dcml.stopped_early"] == "true"
    assert bad.data.params["train.lr"] == "1e-09"
    # the registered model came from the good trial: it carries the version too
    assert good.data.tags["dcml.model_version"] == "bcml@2"
    assert "dcml.model_version" not in bad.data.tags
    assert parent.data.metrics[f"best_{metric}"] == pytest.approx(t.swept.trials[0][metric])


def test_mirroring_a_run_again_adds_nothing_and_the_report_joins_it(tracked):
    """What a resumed run or a repeated hook does: the same run, no duplicate metrics."""
    t = tracked
    run = run_of(t, "tracked-train")
    before = t.client.get_metric_history(run.info.run_id, "val_roc_auc")
    write_report(t.storage, "tracked-train", dataset=t.dv, model=t.models[0])
    tracking.log_training(t.cfg, t.storage, "tracked-train", t.lines.append)
    tracking.log_report(t.cfg, t.storage, "tracked-train", t.lines.append)
    assert not [line for line in t.lines if line.startswith("warning")]
    run = run_of(t, "tracked-train")
    assert len(t.client.get_metric_history(run.info.run_id, "val_roc_auc")) == len(before)
    assert "report.html" in {a.path for a in t.client.list_artifacts(run.info.run_id)}


def test_promote_and_rollback_move_the_alias_tag(tracked):
    t = tracked
    at = [
        "--set",
        f"storage.root={t.root}",
        "--set",
        f"tracking.mlflow_uri={t.cfg.tracking.mlflow_uri}",
        "--set",
        f"tracking.experiment={EXPERIMENT}",
    ]
    assert main(["models", "promote", "bcml", "2", "--alias", "production", "--force", *at]) == 0
    assert run_of(t, "tracked-sweep").data.tags["dcml.aliases"] == "production"
    assert "dcml.aliases" not in run_of(t, "tracked-train").data.tags
    assert main(["models", "rollback", "bcml", "--alias", "production", *at]) == 0
    assert run_of(t, "tracked-train").data.tags["dcml.aliases"] == "production"
    assert "dcml.aliases" not in run_of(t, "tracked-sweep").data.tags


def test_an_unreachable_server_is_one_warning_and_the_stage_goes_on(tracked):
    t = tracked
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = with_values(t.cfg, {"tracking.mlflow_uri": closed}, "test")
    lines: list[str] = []
    started = time.monotonic()
    mv = stage_register(
        cfg, t.dv, t.trained.checkpoint_path, {"run_id": "tracked-train"}, [], lines.append
    )
    tracking.log_training(cfg, t.storage, "tracked-train", lines.append)
    tracking.log_sweep(cfg, t.storage, "tracked-sweep", lines.append)
    tracking.log_aliases(cfg, t.storage, "bcml", lines.append)
    # MLflow's own retries would take minutes: the mirror gives up at once
    assert time.monotonic() - started < 60
    assert mv.version == 3
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1, lines
    assert "tracking.mlflow_uri=" + closed in warnings[0]


def test_without_mlflow_installed_one_warning_names_the_extra(tracked, tmp_path, monkeypatch):
    for name in ("mlflow", "mlflow.tracking", "mlflow.entities"):
        monkeypatch.setitem(sys.modules, name, None)  # `import mlflow` raises ImportError
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = with_values(tracked.cfg, {"tracking.mlflow_uri": uri}, "test")
    lines: list[str] = []
    tracking.log_training(cfg, tracked.storage, "tracked-train", lines.append)
    tracking.log_sweep(cfg, tracked.storage, "tracked-sweep", lines.append)
    assert len(lines) == 1 and "pip install 'dcml[mlflow]'" in lines[0], lines
    assert not (tmp_path / "m.db").exists()


def test_a_local_sqlite_uri_tracks_without_a_server(tracked, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = with_values(tracked.cfg, {"tracking.mlflow_uri": uri}, "test")
    lines: list[str] = []
    tracking.log_training(cfg, tracked.storage, "tracked-train", lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"tracked in MLflow: {uri}, experiment"), lines
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], "tags.`dcml.run_id` = 'tracked-train'")
    assert run.data.params["train.epochs"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_roc_auc")) == 2
    assert "history.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
