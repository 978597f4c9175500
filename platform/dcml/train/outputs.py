"""A finished run's outputs next to its checkpoints: the best checkpoint on the test split,
the history, and the plots."""

from __future__ import annotations

import numpy as np
import torch

from dcml.data.catalog import DatasetVersion, read_split_numpy
from dcml.layout import HISTORY, META, PLOTS
from dcml.storage import Storage
from dcml.train.checkpoint import parse_history
from dcml.train.metrics import task_metrics
from dcml.train.model import load_model
from dcml.train.step import predict


def evaluate_checkpoint(
    storage: Storage, dataset: DatasetVersion, checkpoint: str, split: str
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """A checkpoint's metrics on a split of the dataset (in the driver); also the labels and
    the model's outputs, for plots."""
    model, x, y = _model_and_split(storage, dataset, checkpoint, split)
    task = dataset.manifest["task"]
    out = predict(model, torch.as_tensor(x), task)
    return task_metrics(task, y, out), y, out


def _model_and_split(storage: Storage, dataset: DatasetVersion, checkpoint: str, split: str):
    """A checkpoint's model, and a split's features and labels."""
    meta = storage.read_json(f"{checkpoint}/{META}")
    _, x, y = read_split_numpy(storage, dataset, split)
    return load_model(storage, checkpoint, meta["model_spec"]), x, y


# the score permutation importance takes per task, and whether a higher one is better
IMPORTANCE_METRIC = {"binary": "roc_auc", "multiclass": "accuracy", "regression": "rmse"}


def permutation_importance(
    storage: Storage,
    dataset: DatasetVersion,
    checkpoint: str,
    split: str = "validation",
    repeats: int = 3,
    max_rows: int = 20_000,
    seed: int = 0,
) -> dict[str, float]:
    """How much the split's score (ROC AUC, accuracy or RMSE) worsens when one raw input's
    values are shuffled across rows, on average over `repeats` shuffles: per input column (a
    categorical column's one-hot features move together). At most `max_rows` rows, seeded."""
    model, x, y = _model_and_split(storage, dataset, checkpoint, split)
    task = dataset.manifest["task"]
    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        keep = rng.choice(len(x), max_rows, replace=False)
        x, y = x[keep], y[keep]
    name = IMPORTANCE_METRIC[task]
    sign = -1.0 if name == "rmse" else 1.0  # a worse score is a positive importance

    def score(features: np.ndarray) -> float:
        return task_metrics(task, y, predict(model, torch.as_tensor(features), task))[name]

    base = score(x)
    groups: dict[str, list[int]] = {}
    for j, feature in enumerate(dataset.manifest["features"]):
        groups.setdefault(feature.split("=", 1)[0], []).append(j)
    importance = {}
    for column, at in groups.items():
        drops = []
        for _ in range(repeats):
            shuffled = x.copy()
            shuffled[:, at] = x[rng.permutation(len(x))][:, at]
            drops.append(sign * (base - score(shuffled)))
        importance[column] = float(np.mean(drops))
    return importance


def write_plots(
    storage: Storage,
    run: str,
    history: list[dict[str, float]],
    metric: str,
    dataset: DatasetVersion,
    y: np.ndarray,
    out: np.ndarray,
    importance: dict[str, float] | None = None,
    gain: dict[str, float] | None = None,
    kept: int | None = None,
) -> list[str]:
    """PNGs under <run>/plots/ (layout.RESULT_PLOTS names those of the test split): learning curves;
    binary: ROC curve, calibration and confusion matrix; multiclass: confusion matrix and each
    class's precision and recall; regression: predicted against true, and the residuals."""
    from dcml import plots

    task, classes = dataset.manifest["task"], dataset.manifest["classes"]
    images = {}
    if history:
        images["learning_curves.png"] = plots.learning_curves(history, metric, kept)
    if task == "binary" and len(y):
        auc = task_metrics(task, y, out)["roc_auc"]
        images["roc_curve.png"] = plots.roc_curve(y, out, auc, "ROC curve (test split)")
        images["calibration.png"] = plots.calibration_curve(y, out)
    if task != "regression" and len(y):
        pred = out.argmax(axis=1) if task == "multiclass" else (out >= 0.5).astype(np.int64)
        images["confusion_matrix.png"] = plots.confusion_matrix(
            y.astype(np.int64), pred, classes, "Confusion matrix (test split)"
        )
        if task == "multiclass":
            images["per_class.png"] = plots.per_class_scores(y.astype(np.int64), pred, classes)
    if task == "regression" and len(y):
        images["predicted_vs_true.png"] = plots.predicted_vs_actual(y, out)
        images["residuals.png"] = plots.residuals(y, out)
    if importance:
        images["feature_importance.png"] = plots.feature_importance(
            importance, IMPORTANCE_METRIC[task]
        )
    if gain:
        images["gain_importance.png"] = plots.feature_importance(
            gain, "gain", title="Gain importance", xlabel="share of the trees' total gain"
        )
    storage.fs.makedirs(f"{run}/{PLOTS}", exist_ok=True)
    for name, data in images.items():
        with storage.fs.open(f"{run}/{PLOTS}/{name}", "wb") as f:
            f.write(data)
    return [f"{run}/{PLOTS}/{name}" for name in images]


def publish_history(storage: Storage, run: str, latest: str) -> list[dict[str, float]]:
    """runs/<run_id>/history.csv: the per-epoch metrics kept in the run's latest checkpoint."""
    if not storage.exists(f"{latest}/{HISTORY}"):
        return []
    with storage.fs.open(f"{latest}/{HISTORY}", "rb") as f:
        data = f.read()
    with storage.fs.open(f"{run}/{HISTORY}", "wb") as f:
        f.write(data)
    return parse_history(data.decode())
