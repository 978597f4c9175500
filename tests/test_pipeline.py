"""The whole pipeline end to end on a real local Ray: Data, Train (DDP), Tune, registry, Serve over
real HTTP, batch inference, and the stage verbs of the `dcml` CLI run alone against its storage."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from ray import serve

from dcml import registry
from dcml.cli import main
from dcml.pipeline import raw_test_rows, run_pipeline
from dcml.predictor import Predictor
from dcml.storage import Storage

from .conftest import images, make_config, needs_chromium, render

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    # one trial: the sweeps are test_tune's; here the sweep's place in the pipeline is tested
    cfg = make_config(root, name="bc", train={"epochs": 8, "workers": 2}, tune={"num_samples": 1})
    lines: list[str] = []
    result = run_pipeline(cfg, log=lines.append, keep_serving=True)
    yield cfg, result, lines
    serve.shutdown()  # the next module starts Serve on its own port


def test_served_model_answers_over_http_and_meets_the_quality_bar(pipeline):
    cfg, result, lines = pipeline
    assert result.served_metrics["roc_auc"] >= 0.98
    assert result.served_metrics["accuracy"] >= 0.9
    assert result.model.meta["metrics"]["test_roc_auc"] >= 0.98
    # the test twin of every metric train.metric can select is stored, for the promotion gate
    assert 0 < result.model.meta["metrics"]["test_loss"] < 1
    # what the version predicted on its test split, for `dcml monitor`
    reference = result.model.meta["reference_predictions"]
    assert reference["kind"] == "probability" and reference["cdf"][-1] == 1.0
    assert reference["rows"] == result.dataset.manifest["rows"]["test"]
    text = "\n".join(lines)
    assert "tuning results" in text and "served model on the test split" in text
    assert "validation gate passed" in text
    assert len(result.demo) == cfg.serve.demo_rows

    meta = requests.get(f"{result.url}/metadata", timeout=10).json()
    assert (meta["model"], meta["version"], meta["ref"]) == ("bc", 1, "bc@production")
    assert meta["lineage"]["dataset"] == result.dataset.ref
    assert requests.get(f"{result.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_the_run_writes_one_report_and_dcml_report_prints_it(pipeline, capsys):
    cfg, result, lines = pipeline
    report = Path(result.report)
    assert report.name == "report.html" and report.parent.parent == Path(cfg.storage.root, "runs")
    assert f"report   {result.report}" in "\n".join(lines)
    page = report.read_text()
    sweep_id = next(p.name for p in report.parent.parent.glob("sweep-*"))
    for expected in (
        result.dataset.ref,
        'Validation gate: <span class="pass">passed',
        "History (per epoch)",
        sweep_id,
        result.model.ref,
        f"{result.url}/predict",
    ):
        assert expected in page, expected
    # learning curves, ROC curve, calibration, confusion matrix, permutation importance, the
    # sweep's two plots, the registered model's ROC curve with its decision threshold, and when
    # the sweep's trial won, its learning curves at the top
    from_sweep = "sweep_id" in result.model.meta["lineage"]
    assert len(images(page)) == 8 + from_sweep
    assert ("The registered model came from the sweep" in page) == from_sweep
    assert "decision threshold 0.500 (0.5) marked" in page
    run_id = report.parent.name
    assert main(["report", run_id, "--set", f"storage.root={cfg.storage.root}"]) == 0
    assert capsys.readouterr().out.strip() == result.report


@needs_chromium
def test_the_report_renders_in_chromium_with_its_images(pipeline, tmp_path):
    _, result, _ = pipeline
    seen = render(Path(result.report), tmp_path)
    shown = 8 + ("sweep_id" in result.model.meta["lineage"])
    assert seen["images"] == shown and seen["decoded"] == shown, seen
    assert seen["sections"] == 6, seen


def test_served_predictions_equal_the_offline_predictor(pipeline):
    cfg, result, _ = pipeline
    storage = Storage.from_config(cfg)
    table = raw_test_rows(cfg, result.dataset, limit=20)
    assert table.num_rows == 20
    features = result.dataset.preprocessor.inputs
    rows = [{c: r[c] for c in features} for r in table.to_pylist()]
    served = requests.post(f"{result.url}/predict", json=rows, timeout=30).json()["predictions"]
    offline = Predictor.from_storage(storage, result.model.path).predict_records(rows)
    np.testing.assert_allclose(
        [s["probability"] for s in served], [o["probability"] for o in offline], rtol=1e-6
    )
    assert all(s["model_version"] == "bc@1" for s in served)


def test_bad_requests_get_4xx_naming_the_field_and_the_server_stays_up(pipeline):
    cfg, result, _ = pipeline
    good = dict.fromkeys(result.dataset.preprocessor.inputs, 1.0)
    url = f"{result.url}/predict"
    missing = {k: v for k, v in good.items() if k != "worst area"}
    r = requests.post(url, json=missing, timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "worst area"
    r = requests.post(
        url, data="{not json", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert r.status_code == 422
    r = requests.post(url, data=b"x" * (cfg.serve.max_request_bytes + 1), timeout=10)
    assert r.status_code == 413
    assert "Traceback" not in r.text
    assert requests.post(url, json=good, timeout=10).status_code == 200


def test_stage_verbs_run_alone_against_storage(pipeline, tmp_path, capsys):
    cfg, result, _ = pipeline
    at = ["--set", f"storage.root={cfg.storage.root}", "--set", "name=bc"]

    # batch inference with the production model over the raw shards
    out = tmp_path / "predictions"
    raw = f"{cfg.storage.root}/raw/breast_cancer"
    assert main(["predict", "bc@production", "--input", raw, "--output", str(out), *at]) == 0
    assert "with Ray Data" in capsys.readouterr().out  # auto: this process has a Ray
    table = pq.read_table(out)
    assert table.num_rows == 569
    assert table.column_names == ["id", "label", "probability", "model_version"]
    # the local engine (threads, no Ray) writes the same table, value for value
    local = ["--output", str(tmp_path / "local"), "--set", "predict.engine=local"]
    assert main(["predict", "bc@production", "--input", raw, *local, *at]) == 0
    assert "local threads" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "local").equals(table)
    # a file without a column the model reads: an error naming the file and the column, from
    # the Ray engine's tasks as from the local engine
    (tmp_path / "broken").mkdir()
    broken = pq.read_table(raw).drop_columns(["mean radius"])
    pq.write_table(broken, tmp_path / "broken" / "part.parquet")
    wrong = ["--input", str(tmp_path / "broken"), "--output", str(tmp_path / "no-out")]
    assert main(["predict", "bc@production", *wrong, *at]) == 1
    assert "part.parquet: no column 'mean radius'" in capsys.readouterr().err
    # nothing stored is overwritten, and no other folder is written into
    assert main(["predict", "bc@production", "--input", raw, "--output", str(out), *at]) == 1
    assert "exists" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("someone's")
    mine = ["--output", str(tmp_path / "mine")]
    assert main(["predict", "bc@production", "--input", raw, *mine, *at]) == 1
    assert "holds other files (notes.txt)" in capsys.readouterr().err

    # train alone on the stored dataset version, register, then promote
    dataset = result.dataset.ref
    assert main(["train", *at, "--set", "train.epochs=2", "--dataset", dataset]) == 0
    storage = Storage.from_config(cfg)
    assert registry.list_models(storage)["bc"] == [1, 2]
    assert registry.resolve_model(storage, "bc@production").version == 1
    assert main(["models", "promote", "bc", "2", "--alias", "staging", *at]) == 0
    capsys.readouterr()
    assert main(["models", "list", *at]) == 0
    assert "bc: versions [1, 2]; aliases production->1, staging->2" in capsys.readouterr().out
    assert main(["models", "show", "bc@staging", *at]) == 0
    assert '"dataset": "' + dataset in capsys.readouterr().out
    assert main(["data", "list", *at]) == 0
    assert dataset in capsys.readouterr().out
    assert main(["data", "show", dataset, *at]) == 0
    shown = capsys.readouterr().out
    assert "content hash" in shown and "class_balance" in shown and "569 raw" in shown


def test_use_gpu_without_gpus_fails_fast_with_a_message(pipeline):
    cfg, result, _ = pipeline
    at = ["--set", f"storage.root={cfg.storage.root}", "--set", "train.use_gpu=true"]
    with pytest.raises(RuntimeError, match="train.use_gpu"):
        from dcml.train.trainer import check_resources

        check_resources(make_config(cfg.storage.root, train={"use_gpu": True}), 2)
    assert main(["train", *at, "--dataset", result.dataset.ref]) == 1


def test_the_decision_threshold_is_chosen_on_validation_stored_and_used(pipeline):
    """Registered at 0.5 by default; the same checkpoint registered with a cost policy gets the
    threshold that costs least on the validation split, test metrics at it, and predictors
    that answer by it."""
    from dcml.data.catalog import read_split_numpy
    from dcml.pipeline import stage_register
    from dcml.train.metrics import binary_metrics, choose_threshold

    cfg, result, _ = pipeline
    default = result.model.meta
    assert (default["threshold"], default["threshold_policy"]) == (0.5, "0.5")
    assert {"test_precision", "test_recall"} <= set(default["metrics"])
    assert default["test_roc"]["at_threshold"][1] == pytest.approx(
        default["metrics"]["test_recall"]
    )
    costly = cfg.model_copy(deep=True)
    costly.train.threshold, costly.train.costs.fn = "cost", 50.0
    checkpoint = default["lineage"]["checkpoint"]
    mv = stage_register(costly, result.dataset, checkpoint, {"run_id": "threshold"}, [], print)
    storage = Storage.from_config(cfg)
    predictor = Predictor.from_storage(storage, mv.path)
    _, x_val, y_val = read_split_numpy(storage, result.dataset, "validation")
    chosen = choose_threshold("cost", y_val, predictor.predict_features(x_val), 1.0, 50.0)
    assert mv.meta["threshold_policy"] == "cost" and mv.meta["threshold"] == chosen
    _, x_test, y_test = read_split_numpy(storage, result.dataset, "test")
    at = binary_metrics(y_test, predictor.predict_features(x_test), chosen)
    assert mv.meta["metrics"]["test_recall"] == pytest.approx(at["recall"])
    rows = raw_test_rows(cfg, result.dataset).to_pylist()
    for a in predictor.predict_records(rows):
        assert a["label"] == int(a["probability"] >= chosen)
