"""The storage layout: every folder and file name dcml reads or writes under a storage root, and
the one way weights are read.

    raw/<name>/                         collected raw shards (a committed folder)
    datasets/<name>/<version>/          _manifest.json; shards under the writer's tx-*/ prefix
    runs/<run_id>/                      run.json, checkpoint_*/ (Ray Train), history.csv,
                                        test_metrics.json, plots/, report.html; a sweep's
                                        trials/<trial>/ and trials.csv/.parquet
    models/<name>/<N>/                  _claim.json, model.safetensors, model.json
    models/<name>/aliases/<alias>/      <seq>.json, one per promotion or rollback
    predictions/<name>/<N>/date=<day>/  the prediction log: part-*.parquet, each created whole
    monitoring/<name>/<N>/              `dcml monitor`'s pages, <time>.html
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcml.storage import Storage

MANIFEST = "_manifest.json"  # a committed folder's manifest (dataset, raw data, predictions)
MODEL_JSON = "model.json"  # a model version's manifest
CLAIM = "_claim.json"  # who took a model version number
WEIGHTS = "model.safetensors"  # an MLP's, in model versions and checkpoints
BOOSTER = "model.ubj"  # a gbdt model's booster in XGBoost's UBJSON (no pickle), likewise
RUN_JSON = "run.json"  # a run's dataset and config, created when it starts
# inside a checkpoint
TRAIN_STATE = "train_state.pt"  # optimiser, epoch, early-stopping and scheduler state
META = "meta.json"  # the epoch's metrics, model spec, features
HISTORY = "history.csv"  # one row per epoch (also a run's own history.csv)
# a run's outputs
TEST_METRICS = "test_metrics.json"
IMPORTANCE = "feature_importance.json"  # permutation importance on the validation split
GAIN = "gain_importance.json"  # gbdt: each input's share of the trees' total gain
TRIAL_RESULTS = "result.json"  # in a Tune trial's folder: its reports, one JSON object a line
PLOTS = "plots"
REPORT = "report.html"
# a run's plots of its results (the test split's, and importance on validation), in the order
# the run report shows them, with their captions
RESULT_PLOTS = {
    "roc_curve.png": "ROC curve (test split)",
    "calibration.png": "Calibration: share of positives by predicted probability (test split)",
    "confusion_matrix.png": "Confusion matrix (test split)",
    "per_class.png": "Precision and recall per class (test split)",
    "predicted_vs_true.png": "Predicted against true values (test split)",
    "residuals.png": "Residuals (test split)",
    "feature_importance.png": "Permutation importance: the score lost when an input is shuffled "
    "(validation split)",
    "gain_importance.png": "Gain importance: each input's share of the trees' total gain (gbdt)",
}


def raw_folder(storage: Storage, name: str = "") -> str:
    return storage.path("raw", name)


def dataset_folder(storage: Storage, name: str = "", version: str = "") -> str:
    return storage.path("datasets", name, version)


def run_folder(storage: Storage, run_id: str = "") -> str:
    return storage.path("runs", run_id)


def model_folder(storage: Storage, name: str = "", version: int | str = "") -> str:
    return storage.path("models", name, str(version))


def alias_folder(storage: Storage, name: str, alias: str = "") -> str:
    return storage.path("models", name, "aliases", alias)


def prediction_log_folder(
    storage: Storage, name: str, version: int | str = "", day: str = ""
) -> str:
    return storage.path("predictions", name, str(version), f"date={day}" if day else "")


def monitoring_folder(storage: Storage, name: str, version: int | str) -> str:
    return storage.path("monitoring", name, str(version))


def read_trial_results(storage: Storage, trial_folder: str) -> list[dict]:
    """What a Tune trial reported, epoch by epoch (its result.json, one JSON object a line);
    empty if it stored none."""
    import json

    path = f"{trial_folder}/{TRIAL_RESULTS}"
    if not storage.exists(path):
        return []
    lines = storage.read_bytes(path).decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def model_file(spec: dict | None) -> str:
    """The file that holds a model of this spec: safetensors (MLP) or a booster (gbdt)."""
    kind = (spec or {}).get("kind", "mlp")
    if kind not in ("mlp", "gbdt"):
        raise ValueError(f"a model of kind {kind!r}: this dcml reads mlp and gbdt models")
    return BOOSTER if kind == "gbdt" else WEIGHTS


def read_weights(storage: Storage, folder: str, spec: dict | None = None) -> bytes:
    """The model bytes of a checkpoint or model version folder (an MLP's unless `spec` says)."""
    return storage.read_bytes(f"{folder}/{model_file(spec)}")
