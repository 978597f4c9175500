"""The prediction log and `dcml monitor`, without Ray: a small model whose training reference is
built from synthetic data, traffic scored and logged as a replica logs it, then judged. Each test
has its own store."""

import json
import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcml import registry
from dcml.cli import main
from dcml.data.reference import category_reference, numeric_reference, prediction_reference
from dcml.layout import WEIGHTS
from dcml.prediction_log import PredictionLog, columns_table, read_log, write_log
from dcml.predictor import Predictor
from dcml.service_metrics import EXPORTED
from dcml.storage import Storage

from .conftest import REPO, tiny_categorical_model


def records(rng: np.random.Generator, n: int, shift: float = 0.0, prefix: str = "r", **p):
    """Records like the training data: x ~ N(shift, 1) with 2% missing; color blue/red/green
    (green unseen in training), or drawn with the shares `p`."""
    x = rng.normal(shift, 1.0, n)
    x[rng.random(n) < 0.02] = np.nan
    shares = p.get("colors", [0.6, 0.38, 0.02])
    color = rng.choice(["blue", "red", "green"], n, p=shares)
    return [
        {"id": f"{prefix}{i}", "x": None if np.isnan(v) else float(v), "color": str(c)}
        for i, (v, c) in enumerate(zip(x, color))
    ]


@pytest.fixture
def model(tmp_path):
    """cat@1 (alias production): the tiny model over x and color, with a reference made from
    'training' records drawn like the unchanged traffic, and its predictions on them."""
    storage = Storage(str(tmp_path / "store"))
    meta = tiny_categorical_model(tmp_path / "model")
    train = records(np.random.default_rng(0), 20_000)
    x = np.array([np.nan if r["x"] is None else r["x"] for r in train])
    colors = Counter(r["color"] for r in train)
    meta["preprocessor"]["reference"] = {
        "numeric": {"x": numeric_reference(x)},
        "categorical": {"color": category_reference(colors, 0, ["blue", "red"])},
    }
    meta |= {"name": "cat", "version": 1, "task": "binary"}
    predictor = Predictor((tmp_path / "model" / WEIGHTS).read_bytes(), meta)
    seen = {}
    predictor.predict_records(train, seen)
    meta["reference_predictions"] = prediction_reference("binary", seen["outputs"], ["no", "yes"])
    meta["metrics"] = {"test_accuracy": 0.9, "test_roc_auc": 0.9}
    checkpoint = storage.path("checkpoints", "tiny")
    storage.fs.makedirs(checkpoint, exist_ok=True)
    for f in (tmp_path / "model").iterdir():
        storage.fs.put_file(str(f), f"{checkpoint}/{f.name}")
    mv = registry.register(storage, "cat", checkpoint, meta)
    registry.set_alias(storage, "cat", "production", mv.version)
    return storage, mv


def serve_traffic(storage: Storage, mv, rows: list[dict]) -> list[dict]:
    """Score `rows` in calls of 100 as a replica does, logging every record; the answers."""
    predictor = Predictor.from_storage(storage, mv.path)
    log = PredictionLog(storage, 1.0, flush_rows=700, flush_s=60)
    answers = []
    for start in range(0, len(rows), 100):
        chunk = rows[start : start + 100]
        got = predictor.predict_records(chunk)
        log.add(predictor, chunk, got)
        answers += got
    log.close()
    assert log.dropped == 0
    return answers


def monitor(storage: Storage, *args: str) -> int:
    return main(["monitor", "cat@production", "--set", f"storage.root={storage.root}", *args])


def drifted(out: str) -> str:
    return out.split("drift: ")[1] if "drift: " in out else ""


def test_the_log_holds_every_sampled_record_with_its_prediction(model):
    storage, mv = model
    rows = records(np.random.default_rng(1), 1500)
    answers = serve_traffic(storage, mv, rows)
    logged = read_log(storage, "cat", 1)
    assert sorted(logged.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in logged.to_pylist()}
    for row, answer in zip(rows, answers):
        got = by_id[row["id"]]
        assert (got["x"], got["color"]) == (row["x"], row["color"])
        assert (got["label"], got["probability"]) == (answer["label"], answer["probability"])
        assert got["model_version"] == "cat@1"


def test_unchanged_traffic_passes_and_a_shifted_feature_is_flagged_by_name(model, capsys):
    storage, mv = model
    serve_traffic(storage, mv, records(np.random.default_rng(1), 1500))
    assert monitor(storage) == 0
    out = capsys.readouterr().out
    assert "1500 record(s) logged" in out and "DRIFT" not in out, out
    assert re.search(r"x\s+psi\s+0\.0", out) and re.search(r"color\s+unknown", out), out
    page = out.split("page: ")[1].split()[0]
    assert "<h1>dcml monitor: cat@1</h1>" in storage.fs.cat_file(page).decode()

    serve_traffic(storage, mv, records(np.random.default_rng(2), 1500, shift=1.5, prefix="s"))
    assert monitor(storage) == 3
    out = drifted(capsys.readouterr().out)
    assert "x (psi)" in out and "x (ks)" in out, out
    assert "color" not in out, out


def test_unseen_and_missing_categories_are_flagged_and_since_leaves_old_traffic_out(model, capsys):
    storage, mv = model
    predictor = Predictor.from_storage(storage, mv.path)
    old = records(np.random.default_rng(3), 1000, shift=3.0, prefix="old")
    answers = predictor.predict_records(old)
    table = columns_table(
        predictor,
        np.full(len(old), time.time() - 3 * 86400),  # three days ago
        pa.array([r["id"] for r in old]),
        {"x": pa.array([r["x"] for r in old], pa.float64()), "color": [r["color"] for r in old]},
        {k: [a[k] for a in answers] for k in ("label", "probability", "model_version")},
    )
    write_log(storage, predictor, table)
    # a quarter unseen colors, and a column that is missing a third of the time
    rows = records(np.random.default_rng(4), 1500, colors=[0.45, 0.3, 0.25])
    for r in rows[::3]:
        r["color"] = None
    serve_traffic(storage, mv, rows)
    assert monitor(storage, "--since", "24h") == 3
    out = capsys.readouterr().out
    assert "1500 record(s) logged" in out  # not the shifted traffic of three days ago
    flagged = drifted(out).strip().split(", ")
    assert {"color (missing)", "color (psi)", "color (unknown)"} <= set(flagged), out
    assert not [f for f in flagged if f.startswith("x ")], out  # x looks as in training
    assert monitor(storage, "--since", "all") == 3
    assert "x (psi)" in drifted(capsys.readouterr().out)


def test_labels_give_live_metrics_and_a_flipped_label_rate_is_flagged(tmp_path, model, capsys):
    storage, mv = model
    answers = serve_traffic(storage, mv, records(np.random.default_rng(5), 1200))
    ids = [f"r{i}" for i in range(1000)]
    labels = [a["label"] for a in answers[:1000]]
    # the model's own labels, spelled as a CSV spells them, with a few unknown ids and blanks
    right = tmp_path / "right.csv"
    right.write_text("id,label\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, labels)) + "zz,\n")
    assert monitor(storage, "--labels", str(right)) == 0
    out = capsys.readouterr().out
    assert "1000 logged record(s) have a label" in out
    assert re.search(r"accuracy\s+live\s+1\.0000\s+0\.9000", out), out
    flipped = tmp_path / "flipped.parquet"
    wrong = [{"no": "yes", "yes": "no"}[v] for v in labels]
    pq.write_table(pa.table({"id": ids, "label": wrong}), flipped)
    assert monitor(storage, "--labels", str(flipped)) == 3
    assert "accuracy (live)" in drifted(capsys.readouterr().out)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n" + "".join(f"{i},maybe\n" for i in ids[:3]))  # checked, however few
    assert monitor(storage, "--labels", str(bad)) == 1
    assert f"--labels {bad}: ['maybe'] are not classes" in capsys.readouterr().err


def test_too_little_traffic_or_no_reference_is_reported_not_judged(model, capsys):
    storage, mv = model
    serve_traffic(storage, mv, records(np.random.default_rng(6), 50, shift=5.0))
    assert monitor(storage) == 0
    assert "50 logged record(s): too few to judge" in capsys.readouterr().out
    meta = {**mv.meta, "preprocessor": {**mv.meta["preprocessor"], "reference": None}}
    old = registry.register(storage, "cat", mv.path, meta)  # as built by an older dcml
    serve_traffic(storage, old, records(np.random.default_rng(7), 200))
    assert main(["monitor", old.ref, "--set", f"storage.root={storage.root}"]) == 0
    assert "has no training reference" in capsys.readouterr().out
    for since, why in (("2099-01-01", "in the future"), ("-5d", "use 30m, 24h, 7d")):
        assert monitor(storage, "--since", since) == 1
        assert why in capsys.readouterr().err


def test_a_full_log_buffer_drops_samples_and_counts_them(model):
    storage, mv = model
    predictor = Predictor.from_storage(storage, mv.path)
    dropped = []
    log = PredictionLog(
        storage, 1.0, 10**6, 3600, max_rows=150, on_drop=lambda p, n: dropped.append(n)
    )
    rows = records(np.random.default_rng(8), 100)
    for _ in range(2):
        log.add(predictor, rows, predictor.predict_records(rows))
    assert log.dropped == 50 and dropped == [50]
    log.close()
    assert read_log(storage, "cat", 1).num_rows == 150

    # a few records are written within flush_s, without waiting for flush_rows
    log = PredictionLog(storage, 1.0, flush_rows=10**6, flush_s=0.2)
    log.add(predictor, rows[:3], predictor.predict_records(rows[:3]))
    deadline = time.time() + 10
    while not log.written and time.time() < deadline:
        time.sleep(0.05)
    assert [pq.read_table(storage.fs.open(p)).num_rows for p in log.written] == [3]


def test_an_input_named_like_a_log_column_keeps_its_own_column(tmp_path):
    meta = tiny_categorical_model(tmp_path)
    pre = meta["preprocessor"]
    pre |= {"numeric": ["time"], "fill": {"time": 0.0}, "center": {"time": 0}, "scale": {"time": 1}}
    meta |= {"name": "t", "version": 1}
    predictor = Predictor((tmp_path / WEIGHTS).read_bytes(), meta)
    rows = [{"time": 7.5, "color": "red", "id": 3}]
    answers = predictor.predict_records(rows)
    storage = Storage(str(tmp_path / "store"))
    log = PredictionLog(storage, 1.0)
    log.add(predictor, rows, answers)
    log.close()
    got = read_log(storage, "t", 1).to_pylist()[0]
    assert got["input.time"] == 7.5 and got["time"].year >= 2026 and got["id"] == "3"


def test_dcml_predict_logs_a_sample_of_its_rows_the_way_serve_does(tmp_path, model):
    storage, mv = model
    rows = records(np.random.default_rng(9), 2000, prefix="p")
    inputs = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inputs)
    settings = [f"storage.root={storage.root}", "predict.log_fraction=0.5", "predict.threads=2"]
    flags = [f for s in settings for f in ("--set", s)]
    out = tmp_path / "out"
    assert main(["predict", "cat@1", "-i", str(inputs), "-o", str(out), *flags]) == 0
    log = read_log(storage, "cat", 1)
    assert 800 < log.num_rows < 1200  # half of 2000, give or take
    predicted = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    given = {r["id"]: r for r in rows}
    for r in log.to_pylist():
        assert r["label"] == predicted[r["id"]]["label"]
        assert r["probability"] == predicted[r["id"]]["probability"]
        assert (r["x"], r["color"]) == (given[r["id"]]["x"], given[r["id"]]["color"])
    assert not storage.ls(f"{storage.root}/predictions/cat/1/_staged")  # all published
    # a run that fails (its output exists) logs nothing
    assert main(["predict", "cat@1", "-i", str(inputs), "-o", str(out), *flags]) == 1
    assert read_log(storage, "cat", 1).num_rows == log.num_rows


def test_the_grafana_dashboard_reads_only_metrics_that_replicas_export():
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    exported = {f"ray_{n}{s}" for n, (kind, *_) in EXPORTED.items() for s in suffixes[kind]}
    text = json.dumps(json.loads((REPO / "docs" / "grafana-dcml.json").read_text()))
    used = set(re.findall(r"ray_dcml_\w+", text))
    assert used and used <= exported, used - exported
    doc = (REPO / "docs" / "monitoring.md").read_text()
    documented = set(re.findall(r"^\| `(ray_dcml_\w+)`", doc, re.M))  # the table's rows
    names = {f"ray_{n}" + ("_total" if k == "counter" else "") for n, (k, *_) in EXPORTED.items()}
    assert names == documented
