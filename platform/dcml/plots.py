"""PNG plots of a run: learning curves, ROC curve, confusion matrix (matplotlib, no display)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _figure(width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and CI
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def learning_curves(history: list[dict[str, float]], metric: str, kept: int | None = None) -> bytes:
    """Training and validation loss, and the selection metric, per epoch (per boosting round
    for gbdt, whose history has a `round` column)."""
    fig = _figure(9.0, 3.6)
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = [int(h["epoch"]) + 1 for h in history]
    step = "boosting round" if history and "round" in history[0] else "epoch"
    marker = "." if len(history) <= 60 else None
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        if any(key in h for h in history):
            loss_ax.plot(epochs, [h.get(key, np.nan) for h in history], marker=marker, label=label)
    loss_ax.set(xlabel=step, ylabel="loss", title="Loss")
    loss_ax.legend()
    metric_ax.plot(epochs, [h.get(metric, np.nan) for h in history], marker=marker, color="C2")
    metric_ax.set(xlabel=step, ylabel=metric, title=metric)
    if kept is not None and len(history) > kept:  # gbdt: the round the model ends at
        for ax in (loss_ax, metric_ax):
            ax.axvline(kept, color="grey", linestyle="--", linewidth=1, label=f"kept: {kept}")
        loss_ax.legend()
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    return _png(fig)


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(p), kind="mergesort")
    p_sorted, y_sorted = np.asarray(p)[order], y[order]
    last_of_run = np.r_[np.diff(p_sorted) != 0, True]  # one point per distinct score
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def roc_curve(y: np.ndarray, p: np.ndarray, auc: float, title: str = "ROC curve") -> bytes:
    fpr, tpr = roc_points(y, p)
    fig = _figure(4.5, 4.5)
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"model (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """Counts of (true class, predicted class) as an n x n matrix."""
    return np.bincount(np.asarray(y) * n + np.asarray(pred), minlength=n * n).reshape(n, n)


def confusion_matrix(
    y: np.ndarray, pred: np.ndarray, classes: list[Any], title: str = "Confusion matrix"
) -> bytes:
    counts = confusion(y, pred, len(classes))
    fig = _figure(1.2 * len(classes) + 2.5, 1.0 * len(classes) + 2.2)
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes])
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    high = counts.max() / 2 if counts.size else 0
    for i in ticks:
        for j in ticks:
            color = "white" if counts[i, j] > high else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color)
    return _png(fig)


def metric_by_param(
    trials: list[dict[str, Any]], params: list[str], metric: str, log_scale: list[str] = ()
) -> bytes:
    """A sweep: each trial's best metric against each searched field (failed trials left out,
    and the trials that do not read a field: None there)."""
    fig = _figure(3.6 * len(params) + 0.6, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(params)))
    for ax, param in zip(axes, params):
        done = [t for t in trials if t.get(metric) == t.get(metric) and t[param] is not None]
        values = [t[param] for t in done]
        if all(isinstance(v, int | float) for v in values):
            ax.scatter(values, [t[metric] for t in done], color="C0")
            if param in log_scale:
                ax.set_xscale("log")
        else:  # categorical: one position per distinct value
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], [t[metric] for t in done])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=param, ylabel=metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"best {metric} per trial")
    return _png(fig)


def trial_curves(curves: dict[str, tuple[list, list]], metric: str, xlabel: str = "epoch") -> bytes:
    """A sweep: each trial's metric per report (trials stopped early end early)."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for trial, (epochs, values) in sorted(curves.items()):
        ax.plot(epochs, values, marker=".", label=trial)
    ax.set(xlabel=xlabel, ylabel=metric, title="Trials")
    if 0 < len(curves) <= 12:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _png(fig)


def drift_bars(name: str, bins: list[str], reference: np.ndarray, live: np.ndarray) -> bytes:
    """The share of training and of served records in each bin of a feature (or prediction)."""
    fig = _figure(7.0, 3.2)
    ax = fig.subplots()
    x = np.arange(len(bins))
    ax.bar(x - 0.2, reference, 0.4, label="training")
    ax.bar(x + 0.2, live, 0.4, label="served")
    ax.set_xticks(x, bins, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share of records")
    ax.set_title(name)
    ax.legend()
    return _png(fig)


def roc_at_threshold(roc: dict[str, Any], threshold: float, auc: float) -> bytes:
    """A stored ROC curve (`fpr`, `tpr`) with the point the decision threshold gives."""
    fig = _figure(4.8, 4.2)
    ax = fig.subplots()
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    fpr, tpr = roc["at_threshold"]
    ax.plot([fpr], [tpr], "o", color="crimson", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve (test split)")
    ax.legend(loc="lower right")
    return _png(fig)


def calibration_curve(y: np.ndarray, p: np.ndarray, bins: int = 10) -> bytes:
    """Binary: the share of positives against the mean predicted probability, per decile of
    the probabilities (a calibrated model lies on the diagonal), and how many rows each holds."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    rows = np.bincount(which, minlength=max(len(edges) - 1, 1))
    held = rows > 0
    mean_p = np.bincount(which, weights=p, minlength=len(rows))[held] / rows[held]
    observed = np.bincount(which, weights=y, minlength=len(rows))[held] / rows[held]
    fig = _figure(4.5, 4.5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    ax.plot(mean_p, observed, "o-", label="model")
    for x, o, n in zip(mean_p, observed, rows[held]):
        ax.annotate(str(n), (x, o), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="mean predicted probability", ylabel="share of positives")
    ax.set(title="Calibration (test split)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def per_class_scores(y: np.ndarray, pred: np.ndarray, classes: list[Any]) -> bytes:
    """Multiclass: each class's precision and recall, side by side."""
    n = len(classes)
    counts = confusion(y, pred, n)
    tp = np.diag(counts).astype(np.float64)
    precision = np.divide(tp, counts.sum(axis=0), out=np.zeros(n), where=counts.sum(axis=0) > 0)
    recall = np.divide(tp, counts.sum(axis=1), out=np.zeros(n), where=counts.sum(axis=1) > 0)
    fig = _figure(max(4.5, 0.9 * n + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x - 0.2, precision, 0.4, label="precision")
    ax.bar(x + 0.2, recall, 0.4, label="recall")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set(ylim=(0, 1.05), title="Precision and recall per class (test split)")
    ax.legend(loc="lower right")
    return _png(fig)


def predicted_vs_actual(y: np.ndarray, pred: np.ndarray) -> bytes:
    """Regression: predictions against the true values (a perfect model lies on the diagonal)."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    fig = _figure(4.5, 4.5)
    ax = fig.subplots()
    ax.scatter(y, pred, s=6, alpha=0.5)
    low, high = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([low, high], [low, high], linestyle="--", color="grey")
    ax.set(xlabel="true value", ylabel="predicted", title="Predicted against true (test split)")
    ax.grid(alpha=0.3)
    return _png(fig)


def residuals(y: np.ndarray, pred: np.ndarray) -> bytes:
    """Regression: the errors (predicted - true) against the prediction, and their spread."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    err = pred - y
    fig = _figure(9.0, 3.6)
    scatter, spread = fig.subplots(1, 2)
    scatter.scatter(pred, err, s=6, alpha=0.5)
    scatter.axhline(0, linestyle="--", color="grey")
    scatter.set(xlabel="predicted", ylabel="residual (predicted - true)", title="Residuals")
    spread.hist(err, bins=30)
    spread.set(xlabel="residual", ylabel="rows", title="Residuals' distribution (test split)")
    return _png(fig)


def feature_importance(
    importance: dict[str, float],
    metric: str,
    top: int = 20,
    title: str = "Permutation importance",
    xlabel: str | None = None,
) -> bytes:
    """The inputs whose shuffling worsens the score most (or another importance), as
    horizontal bars."""
    ranked = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[:top]
    names, values = [k for k, _ in ranked][::-1], [v for _, v in ranked][::-1]
    fig = _figure(6.5, 0.28 * len(names) + 1.4)
    ax = fig.subplots()
    ax.barh(names, values)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set(xlabel=xlabel or f"{metric} lost when the input is shuffled", title=title)
    ax.tick_params(axis="y", labelsize=7)
    return _png(fig)
