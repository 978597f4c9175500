"""Metrics per task in NumPy (no scikit-learn needed on workers or a GPU box)."""

from __future__ import annotations

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula, with ties given their average rank."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average ranks over runs of equal scores
    _, start, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    y = np.asarray(y).astype(np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    pred = p >= threshold
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": float((pred == (y == 1)).mean()),
        "roc_auc": roc_auc(y, p),
        "log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def multiclass_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and log loss from class probabilities (rows, classes)."""
    y = np.asarray(y).astype(np.int64)
    proba = np.clip(np.asarray(proba, dtype=np.float64), 1e-7, 1.0)
    pred = proba.argmax(axis=1)
    f1s = []
    for k in range(proba.shape[1]):
        tp = float(((pred == k) & (y == k)).sum())
        fp = float(((pred == k) & (y != k)).sum())
        fn = float(((pred != k) & (y == k)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "macro_f1": float(np.mean(f1s)),
        "log_loss": float(-np.log(proba[np.arange(len(y)), y]).mean()) if len(y) else float("nan"),
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    err = pred - y
    total = float(((y - y.mean()) ** 2).sum())
    return {
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
        "r2": 1.0 - float((err**2).sum()) / total if total > 0 else float("nan"),
    }


def task_metrics(
    task: str, y: np.ndarray, out: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """The metrics of a task, from the model's outputs as `predict` gives them (binary: the
    labels from `threshold`)."""
    if task == "multiclass":
        return multiclass_metrics(y, out)
    if task == "regression":
        return regression_metrics(y, out)
    return binary_metrics(y, out, threshold)


def choose_threshold(
    policy: float | str, y: np.ndarray, p: np.ndarray, cost_fp: float = 1.0, cost_fn: float = 1.0
) -> float:
    """The probability from which a binary model answers positive: `policy` itself when it is a
    number, else the one that is best on (y, p) (the validation split): max_f1, youden (the
    largest TPR - FPR) or cost (the least cost_fp * FP + cost_fn * FN). A chosen threshold lies
    halfway between two neighbouring scores, so that scores near it are not decided by a tie.
    Without both classes in `y` nothing can be chosen: 0.5."""
    if not isinstance(policy, str):
        return float(policy)
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return 0.5
    scores = np.unique(p)  # candidate t: positive when p >= t
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    tp = n_pos - np.searchsorted(pos, scores, side="left")
    fp = n_neg - np.searchsorted(neg, scores, side="left")
    # and above every score: nothing positive (where false positives cost most)
    scores, tp, fp = np.r_[scores, (scores[-1] + 1) / 2], np.r_[tp, 0], np.r_[fp, 0]
    fn = n_pos - tp
    if policy == "max_f1":
        gain = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=tp > 0)
    elif policy == "youden":
        gain = tp / n_pos - fp / n_neg
    elif policy == "cost":
        gain = -(cost_fp * fp + cost_fn * fn)
    else:
        raise ValueError(f"train.threshold: unknown policy {policy!r}")
    halfway = (np.r_[0.0, scores[:-1]] + scores) / 2
    # of the thresholds that do equally well, the one nearest 0.5 (a wide gap between the
    # classes' scores leaves many)
    tied = np.flatnonzero(gain >= gain.max() - 1e-12)
    return float(halfway[tied[np.argmin(np.abs(halfway[tied] - 0.5))]])
