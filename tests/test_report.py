"""The run report on a small fake run folder (no Ray): contents, escaping, missing inputs, object
storage, `dcml report`, and rendering in headless Chromium with its images."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np

from dcml import plots
from dcml.cli import main
from dcml.config import public_dump
from dcml.registry import ModelVersion
from dcml.report import report_path, write_report
from dcml.storage import Storage

from .conftest import PNG, images, make_config, needs_chromium, render

RUN, SWEEP = "train-20250101-000000-abcd", "sweep-20250101-000100-ef01"
NASTY = "<script>alert('x')</script>"  # a value in stored text that must come out as text


def _put(storage: Storage, path: str, data: bytes) -> None:
    storage.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with storage.fs.open(path, "wb") as f:
        f.write(data)


def fake_run(storage: Storage, root: str, sweep: bool = True) -> None:
    """What preprocess, train and tune store, with small real plots."""
    manifest = {
        "name": "bc",
        "version": "v1",
        "created_at": 1.7e9,
        "source": "bundled:breast_cancer",
        "format": "parquet",
        "source_files": ["a.parquet", "b.parquet"],
        "task": "binary",
        "classes": [0, 1],
        "class_counts": {"train": [140, 250], "validation": [30, 55], "test": [42, 52]},
        "columns": {"numeric": ["x1", "x2"], "categorical": []},
        "features": ["x1", "x2"],
        "content_hash": "c0ffee" * 10,
        "rows": {
            "raw": 572,
            "dropped": {"duplicate": 2, "missing_label": 1, "gate_repair": 0},
            "augmented": 0,
            "train": 390,
            "validation": 85,
            "test": 94,
        },
        "gate": {
            "passed": True,
            "dropped_rows": 1,
            "imputed_values": 0,
            "rounds": [
                [
                    {
                        "check": "finite",
                        "passed": False,
                        "detail": f"1 non-finite value(s) in {NASTY!r}",
                        "column": NASTY,
                        "split": None,
                        "examples": [{"id": 7, "file": "a.parquet", "row": 3}],
                        "repairable": True,
                    }
                ],
                [{"check": "finite", "passed": True, "detail": "no non-finite value(s)"}],
            ],
        },
    }
    storage.write_json(storage.path("datasets", "bc", "v1", "_manifest.json"), manifest)
    cfg = make_config(root, name="bc")
    run = storage.path("runs", RUN)
    record = {"run_id": RUN, "kind": "train", "dataset": "bc@v1", "config": public_dump(cfg)}
    storage.write_json(f"{run}/run.json", record)
    history = [
        {"epoch": e, "train_loss": 0.6 / (e + 1), "val_loss": 0.5 / (e + 1), "val_roc_auc": 0.9}
        for e in range(3)
    ]
    lines = ["epoch,train_loss,val_loss,val_roc_auc,time"]
    lines += [f"{h['epoch']},{h['train_loss']},{h['val_loss']},0.9,1700000000.5" for h in history]
    _put(storage, f"{run}/history.csv", ("\n".join(lines) + "\n").encode())
    storage.write_json(
        f"{run}/test_metrics.json",
        {"checkpoint": f"{run}/checkpoint_000002", "accuracy": 0.96, "roc_auc": 0.991},
    )
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    _put(storage, f"{run}/plots/learning_curves.png", plots.learning_curves(history, "val_roc_auc"))
    _put(storage, f"{run}/plots/roc_curve.png", plots.roc_curve(y, p, 0.83))
    _put(storage, f"{run}/plots/confusion_matrix.png", plots.confusion_matrix(y, p > 0.5, [0, 1]))
    if sweep:
        folder = storage.path("runs", SWEEP)
        storage.write_json(f"{folder}/run.json", {**record, "run_id": SWEEP, "kind": "tune"})
        trials = [
            {"trial": "a1b2c_00000", "train.lr": 0.003, "epochs": 3, "val_roc_auc": 0.99},
            {"trial": "a1b2c_00001", "train.lr": 0.0001, "epochs": 1, "val_roc_auc": 0.8},
        ]
        csv = "trial,train.lr,model.depth,epochs,val_roc_auc,status,error\n"
        csv += "a1b2c_00000,0.003,2,3,0.99,finished,\n"
        csv += "12345_00001,0.0001,3,1,0.8,stopped early,\n"
        _put(storage, f"{folder}/trials.csv", csv.encode())
        curves = {"a1b2c_00000": ([1, 2, 3], [0.9, 0.95, 0.99])}
        image = plots.metric_by_param(trials, ["train.lr"], "val_roc_auc", ["train.lr"])
        _put(storage, f"{folder}/plots/metric_by_param.png", image)
        _put(storage, f"{folder}/plots/trial_curves.png", plots.trial_curves(curves, "val_roc_auc"))


def fake_model(storage: Storage, version: int = 1) -> ModelVersion:
    meta = {
        "metrics": {"test_accuracy": 0.96, "test_roc_auc": 0.991},
        "validation_metrics": {"epoch": 2, "val_roc_auc": 0.99, "lr": 0.003},
        "lineage": {"dataset": "bc@v1", "run_id": RUN},
    }
    return ModelVersion("bc", version, storage.path("models", "bc", str(version)), meta)


def full_report(storage: Storage) -> str:
    fake_run(storage, storage.uri())
    model = fake_model(storage)
    return write_report(
        storage,
        RUN,
        sweep_id=SWEEP,
        model=model,
        served=model,
        url="http://127.0.0.1:8000/bc",
        served_metrics={"accuracy": 0.957, "roc_auc": 0.99},
    )


def test_report_holds_every_section_in_one_self_contained_file(tmp_path):
    storage = Storage(str(tmp_path))
    uri = full_report(storage)
    assert uri == str(tmp_path / "runs" / RUN / "report.html")
    page = Path(uri).read_text()
    assert not list((tmp_path / "runs" / RUN).glob("*.tmp-*"))  # written atomically

    # five plots, each a PNG inside the page; nothing else is fetched, nothing runs
    srcs = images(page)
    assert len(srcs) == 5
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert not re.search(r"<(script|link|iframe|object)\b", page, re.I)
    assert not re.search(r"(href|src)=\"(?!data:)", page) and "url(" not in page

    # stored text comes out as text
    assert NASTY not in page and html.escape(NASTY) in page
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    for expected in (
        "bc@v1",  # dataset
        "572 raw",
        "missing_label",
        "Validation gate: passed",
        "a.parquet row 3 (id 7)",
        "seed",  # training config
        "batch_size",
        "History (per epoch)",
        "a1b2c_00000",  # tuning
        "12345_00001",
        "stopped early",
        "roc_auc",  # test metrics
        "0.991",
        "lineage: run_id",  # registered and served model
        "http://127.0.0.1:8000/bc/predict",
        "0.957",
    ):
        assert expected in text, expected
    # epochs counted from 1, as in the logs; wall-clock stamps left out
    history = page[page.index("History (per epoch)") :]
    assert re.search(r"<td class=\"num\">1</td><td class=\"num\">0.6</td>", history)
    assert "1700000000" not in page


def test_sections_without_inputs_say_so(tmp_path):
    storage = Storage(str(tmp_path))
    # nothing stored at all
    page = Path(write_report(storage, "train-missing")).read_text()
    for expected in ("no dataset recorded", "not run: no folder", "Tuning</h2><p", "not served"):
        assert expected in page, expected
    assert "<img" not in page

    # a run with its record only: its dataset is gone, no plots, a sweep that stored nothing
    storage.write_json(
        storage.path("runs", "train-bare", "run.json"), {"run_id": "x", "dataset": "bc@v9"}
    )
    page = Path(write_report(storage, "train-bare", sweep_id="sweep-gone")).read_text()
    for expected in (
        "dataset bc@v9 not found",
        "Learning curves: no plot stored",
        "no history.csv",
        "sweep-gone: no trials.csv",
        "not run: no test_metrics.json",
        "not registered",
    ):
        assert expected in page, expected


def test_report_on_object_storage(tmp_path):
    storage = Storage(f"memory://report-{tmp_path.name}")
    uri = full_report(storage)
    assert uri == storage.uri("runs", RUN, "report.html") and uri.startswith("memory://")
    with storage.fs.open(report_path(storage, RUN), "r") as f:
        assert len(images(f.read())) == 5


def test_dcml_report_prints_the_path_or_names_the_missing_run(tmp_path, capsys):
    storage = Storage(str(tmp_path))
    uri = full_report(storage)
    at = ["--set", f"storage.root={tmp_path}"]
    assert main(["report", RUN, *at]) == 0
    assert capsys.readouterr().out.strip() == uri

    assert main(["report", "train-nope", *at]) == 1
    err = capsys.readouterr().err
    assert "train-nope" in err and "no run" in err

    storage.write_json(storage.path("runs", "train-alone", "run.json"), {"run_id": "x"})
    assert main(["report", "train-alone", *at]) == 1
    err = capsys.readouterr().err
    assert "train-alone" in err and "dcml run" in err


@needs_chromium
def test_report_renders_in_chromium_with_its_images(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    report = Path(full_report(storage))
    seen = render(report, tmp_path)
    assert seen["images"] == 5 and seen["decoded"] == 5, seen
    assert seen["sections"] == 6 and seen["height"] > 2000, seen


def test_a_model_from_a_sweep_trial_is_named_at_the_top_with_its_own_curves(tmp_path):
    storage = Storage(str(tmp_path))
    fake_run(storage, storage.uri())
    trial = storage.path("runs", SWEEP, "_inline_trial_a1b2c_00000_0_train_lr=0.003")
    rows = [{"epoch": e, "train_loss": 0.5 / (e + 1), "val_loss": 0.4 / (e + 1)} for e in range(3)]
    _put(storage, f"{trial}/result.json", "\n".join(map(json.dumps, rows)).encode())
    model = fake_model(storage)
    model.meta["lineage"] = {
        "dataset": "bc@v1",
        "sweep_id": SWEEP,
        "checkpoint": f"{trial}/checkpoint_000002",
        "params": {"train.lr": 0.003},
    }
    page = Path(write_report(storage, RUN, sweep_id=SWEEP, model=model)).read_text()
    top = page.split("<h2>Dataset")[0]
    assert "The registered model came from the sweep" in top and SWEEP in top
    assert "_inline_trial_a1b2c_00000" in top and "train.lr" in top
    assert len(images(top)) == 1  # the trial's learning curves
    # a model from this run: no such section
    page = Path(write_report(storage, RUN, sweep_id=SWEEP, model=fake_model(storage))).read_text()
    assert "came from the sweep" not in page
