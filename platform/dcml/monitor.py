"""`dcml monitor`: served traffic (the prediction log) against the training split's reference.

Per numeric feature the population stability index (PSI) over the reference's deciles and the
Kolmogorov-Smirnov statistic against its quantiles; per categorical feature the PSI over its most
frequent categories; per feature the rise of its missing share and, for categories, of its share
unseen in training; the PSI of the predictions against what the version predicted on its test
split; and, with labels, the live metrics against the test metrics at registration. Every
reference was stored with the dataset's preprocessor state and the model version, so no training
data is read again.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dcml.config_watch import MonitorConfig
from dcml.data.columns import class_key
from dcml.data.reference import decile_bins
from dcml.data.transforms import Preprocessor, as_float, as_text
from dcml.direction import mode_of
from dcml.prediction_log import input_column, read_log
from dcml.registry import ModelVersion

FLOOR = 1e-4  # a share of 0 in PSI's logarithm
SHOWN_METRICS = {
    "binary": ["accuracy", "roc_auc"],
    "multiclass": ["accuracy", "macro_f1"],
    "regression": ["rmse", "mae"],
}


Bins = tuple[list[str], np.ndarray, np.ndarray]  # names, reference shares, live shares


@dataclass
class Check:
    subject: str  # a feature, "predictions", or a metric's name
    check: str  # psi, ks, missing, unknown, or live (a metric with labels)
    value: float
    threshold: float
    reference: float | None = None  # training's share, or the test metric
    flagged: bool = False
    bins: Bins | None = field(default=None, repr=False)  # what a PSI compared, for the page


@dataclass
class Monitored:
    model: str  # NAME@VERSION
    ref: str  # what the user asked for
    since: float | None
    records: int
    first: float | None = None
    last: float | None = None
    labelled: int = 0
    checks: list[Check] = field(default_factory=list)
    note: str = ""  # why nothing was judged
    labels_note: str = ""  # how many logged records the labels matched

    @property
    def flagged(self) -> list[Check]:
        return [c for c in self.checks if c.flagged]

    def table(self) -> str:
        lines = [f"{'subject':<28}{'check':<9}{'value':>10}{'reference':>10}{'limit':>8}  status"]
        for c in self.checks:
            ref = "" if c.reference is None else f"{c.reference:.4f}"
            status = "DRIFT" if c.flagged else "ok"
            lines.append(
                f"{c.subject[:27]:<28}{c.check:<9}{c.value:>10.4f}{ref:>10}"
                f"{c.threshold:>8.3g}  {status}"
            )
        return "\n".join(lines)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_drift(reference: dict[str, Any], live: np.ndarray) -> tuple[float, float, Bins]:
    """(PSI, KS, the bins) of the finite live values against a stored distribution."""
    v = np.sort(live[np.isfinite(live)])
    if not len(v) or not reference.get("points"):
        return 0.0, 0.0, ([], np.zeros(0), np.zeros(0))
    edges, expected = decile_bins(reference)
    actual = np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(expected)) / len(v)
    points, cdf = np.asarray(reference["points"]), np.asarray(reference["cdf"])
    live_cdf = np.searchsorted(v, points, side="right") / len(v)
    ks = float(np.max(np.abs(live_cdf - cdf)))
    names = [f"<={e:.4g}" for e in edges] + [f">{edges[-1]:.4g}"]
    return psi(expected, actual), ks, (names, expected, actual)


def category_drift(frequencies: dict[str, float], live: list[str]) -> tuple[float, Bins]:
    """PSI (and the bins) over the reference's categories plus one bin for all others."""
    expected = np.array([*frequencies.values(), max(0.0, 1.0 - sum(frequencies.values()))])
    counts = dict.fromkeys(frequencies, 0)
    other = 0
    for value in live:
        if value in counts:
            counts[value] += 1
        else:
            other += 1
    actual = np.array([*counts.values(), other]) / max(len(live), 1)
    return psi(expected, actual), ([*frequencies, "(other)"], expected, actual)


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """'30m', '24h', '7d' (ago) or a date/time in ISO form (UTC) -> Unix time; None: all."""
    if not text or text == "all":
        return None
    now = time.time() if now is None else now
    units = {"m": 60, "h": 3600, "d": 86400}
    usage = (
        f"--since {text!r}: use 30m, 24h, 7d, a date or time (2026-11-01, 2026-11-01T08:00) or all"
    )
    try:
        if text[-1:] in units:
            ago = float(text[:-1]) * units[text[-1]]
            if not 0 < ago < 100 * 365 * 86400:
                raise ValueError
            since = now - ago
        else:
            stamp = dt.datetime.fromisoformat(text)
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.timezone.utc)
            since = stamp.timestamp()
    except (ValueError, OverflowError):
        raise ValueError(usage) from None
    if since > now:
        raise ValueError(f"--since {text!r} is in the future: no traffic logged from then yet")
    return since


def monitor(
    storage,
    mv: ModelVersion,
    ref: str,
    cfg: MonitorConfig,
    since: float | None,
    labels: pa.Table | None = None,
    labels_uri: str = "",
) -> Monitored:
    table = read_log(storage, mv.name, mv.version, since)
    n = 0 if table is None else table.num_rows
    result = Monitored(mv.ref, ref, since, n)
    if table is None or not n:
        result.note = (
            f"no logged predictions of {mv.ref}"
            + (" in this window" if since else "")
            + " (serve.log_fraction above 0 logs them)"
        )
        return result
    times = pc.min_max(table.column("time"))
    result.first, result.last = (times[k].value / 1000 for k in ("min", "max"))
    if n < cfg.min_records:
        result.note = (
            f"{n} logged record(s): too few to judge (monitor.min_records={cfg.min_records})"
        )
        return result
    pre = Preprocessor.from_json(mv.meta["preprocessor"])
    if not pre.reference:
        result.note = (
            f"{mv.ref} has no training reference: its dataset was built by an older dcml "
            "(preprocess again and register a new version)"
        )
        return result
    result.checks = feature_checks(pre, table, cfg) + prediction_checks(mv.meta, table, cfg)
    if labels is not None:
        result.labelled, result.labels_note, checks = label_checks(
            mv.meta, table, labels, cfg, labels_uri
        )
        result.checks += checks
    return result


def feature_checks(pre: Preprocessor, table: pa.Table, cfg: MonitorConfig) -> list[Check]:
    """Per feature: the distribution's shift (over the values present; a column with none has
    only its missing share judged), and the rise of its missing (and unseen) share."""
    ref, checks = pre.reference, []
    for c in pre.numeric:
        r = ref["numeric"][c]
        values = as_float(table.column(input_column(c)))
        if np.isfinite(values).any():
            value_psi, ks, bins = numeric_drift(r, values)
            n = int(np.isfinite(values).sum())
            checks.append(_psi_check(c, value_psi, bins, cfg.psi, r.get("rows"), n))
            limit = cfg.ks + 0.87 * np.sqrt(_inverse(r.get("rows")) + 1 / n)  # KS's mean by chance
            checks.append(Check(c, "ks", ks, float(limit), flagged=ks > limit))
        checks.append(_rise(c, "missing", float(np.isnan(values).mean()), r["missing"], cfg))
    for c in pre.categorical:
        r = ref["categorical"][c]
        text = as_text(table.column(input_column(c)))
        present = pc.drop_null(text).to_pylist()
        if present:
            value_psi, bins = category_drift(r["frequencies"], present)
            checks.append(_psi_check(c, value_psi, bins, cfg.psi, r.get("rows"), len(present)))
            known = set(pre.categories[c])
            unknown = sum(v not in known for v in present) / len(present)
            checks.append(_rise(c, "unknown", unknown, r["unknown"], cfg, cfg.unknown_rate))
        checks.append(_rise(c, "missing", text.null_count / len(text), r["missing"], cfg))
    return checks


def _rise(
    subject: str,
    check: str,
    value: float,
    reference: float,
    cfg: MonitorConfig,
    threshold: float | None = None,
) -> Check:
    limit = cfg.missing_rate if threshold is None else threshold
    return Check(subject, check, value, limit, reference, flagged=value - reference > limit)


def prediction_checks(meta: dict[str, Any], table: pa.Table, cfg: MonitorConfig) -> list[Check]:
    ref = meta.get("reference_predictions")
    if not ref:
        return []
    if ref["kind"] == "class":
        labels = as_text(table.column("label")).to_pylist()
        value, bins = category_drift(ref["frequencies"], labels)
        n = len(labels)
    else:
        column = "probability" if ref["kind"] == "probability" else "value"
        values = as_float(table.column(column))
        value, _, bins = numeric_drift(ref, values)
        n = int(np.isfinite(values).sum())
    return [_psi_check("predictions", value, bins, cfg.prediction_psi, ref.get("rows"), n)]


def _psi_check(subject: str, value: float, bins: Bins, limit: float, n_ref, n_live: int) -> Check:
    """A PSI against `limit` plus what sampling alone gives on average, (bins - 1) x
    (1/n_reference + 1/n_live): with 10 bins, 0.1 for a test split of 91 rows against 350
    served records; 0.01 for a 200k-row sample against 1,000."""
    noise = (len(bins[0]) - 1) * (_inverse(n_ref) + 1 / max(n_live, 1))
    effective = limit + noise
    return Check(subject, "psi", value, effective, flagged=value > effective, bins=bins)


def _inverse(n) -> float:
    """1/n for a reference's row count; 0 where it was not stored."""
    return 1 / n if n else 0.0


def label_checks(
    meta: dict[str, Any], table: pa.Table, labels: pa.Table, cfg: MonitorConfig, uri: str = ""
) -> tuple[int, str, list[Check]]:
    """Live metrics on the logged records whose id has a label, against the test metrics:
    (records labelled, a note, the checks). Labels compare as training compares them
    (`class_key`: 1, 1.0, "1"; true, "true"); rows with no label are left out."""
    from dcml.train.metrics import task_metrics

    where = f"--labels {uri}".strip()
    for needed in ("id", "label"):
        if needed not in labels.column_names:
            raise ValueError(f"{where}: no {needed!r} column (it has {labels.column_names})")
    text = pc.utf8_trim_whitespace(as_text(labels.column("label")))
    labels = labels.filter(pc.and_(pc.is_valid(text), pc.not_equal(text, "")))  # no label
    task = meta.get("task", "binary")
    classes = meta.get("classes") or ([0, 1] if task == "binary" else None)
    given = labels.column("label").to_pylist()
    # every label is checked, whether or not its id was logged
    if task == "regression":
        try:
            given = [float(v) for v in given]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: labels of a regression model must be numbers") from None
    else:
        index = {class_key(c): i for i, c in enumerate(classes)}
        unknown = sorted({class_key(v) for v in given} - set(index))
        if unknown:
            raise ValueError(f"{where}: {unknown[:5]} are not classes of this model ({classes})")
        given = [index[class_key(v)] for v in given]
    truth = dict(zip(as_text(labels.column("id")).to_pylist(), given))
    ids = table.column("id").to_pylist()
    rows = [i for i, key in enumerate(ids) if key is not None and key in truth]
    matched = f"{len(rows)} logged record(s) have a label in {uri or 'the labels'}"
    if len(rows) < cfg.min_records:
        return len(rows), f"{matched}: too few to judge (monitor.min_records={cfg.min_records})", []
    logged = table.take(pa.array(rows))
    y = np.array([truth[k] for k in logged.column("id").to_pylist()])
    if task == "regression":
        out = as_float(logged.column("value"))
    elif task == "binary":
        out = as_float(logged.column("probability"))
    else:
        out = np.column_stack([as_float(logged.column(f"probability_{c}")) for c in classes])
    live = task_metrics(task, y, out, meta.get("threshold", 0.5))
    tested = meta.get("metrics", {})
    checks = []
    for name in SHOWN_METRICS[task]:
        test, value = tested.get(f"test_{name}"), live.get(name)
        if value is None or test is None or not np.isfinite(value):  # one class only: no AUC
            continue
        if mode_of(name) == "max":
            flagged = test - value > cfg.metric_drop
        else:
            flagged = value > test * (1 + cfg.metric_drop)
        checks.append(Check(name, "live", value, cfg.metric_drop, test, flagged))
    return len(rows), matched, checks


def window(result: Monitored) -> str:
    if result.first is None:
        return "no records"
    fmt = "%Y-%m-%d %H:%M"
    first, last = (time.strftime(fmt, time.gmtime(t)) for t in (result.first, result.last))
    return f"{result.records} record(s) logged {first} to {last} UTC"


def write_page(storage, result: Monitored, thresholds: MonitorConfig) -> str:
    """monitoring/<name>/<version>/<time>.html: the summary, every check, and the reference
    against live traffic for the predictions and each drifted feature (or the 6 that moved
    most), images embedded as in the run report; its URI."""
    from dcml import plots
    from dcml.layout import monitoring_folder
    from dcml.report import CSS, _e, _kv, _png_figure, _Raw, _table

    verdict = result.note or "no drift"
    if result.flagged:
        verdict = f"{len(result.flagged)} check(s) over their threshold"
    summary = [
        ("model version", result.model),
        ("asked for", result.ref),
        ("traffic", window(result)),
        ("labelled records", result.labels_note or result.labelled),
        ("verdict", verdict),
        ("written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())),
    ]
    rows = [
        [
            c.subject,
            c.check,
            c.value,
            "" if c.reference is None else c.reference,
            c.threshold,
            _Raw(
                '<span class="fail">DRIFT</span>' if c.flagged else '<span class="pass">ok</span>'
            ),
        ]
        for c in result.checks
    ]
    psis = [c for c in result.checks if c.bins is not None and len(c.bins[0])]
    shown = [c for c in psis if c.flagged or c.subject == "predictions"]
    shown += sorted((c for c in psis if c not in shown), key=lambda c: -c.value)[
        : max(0, 6 - len(shown))
    ]
    figures = "".join(
        _png_figure(plots.drift_bars(c.subject, *c.bins), f"{c.subject}: PSI {c.value:.3f}")
        for c in shown
    )
    limits = [(k, v) for k, v in thresholds.model_dump().items()]
    name, version = result.model.split("@")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(f'dcml monitor {result.model}')}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<h1>dcml monitor: {_e(result.model)}</h1>\n{_kv(summary)}\n"
        "<h2>Checks</h2>\n"
        + (
            _table(["subject", "check", "value", "reference", "limit", "status"], rows)
            if rows
            else f"<p>{_e(verdict)}</p>"
        )
        + "\n<h2>Training against traffic</h2>\n"
        + (figures or "<p>nothing to plot</p>")
        + f"\n<h2>Thresholds (monitor.*)</h2>\n{_kv(limits)}\n</body>\n</html>\n"
    )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = f"{monitoring_folder(storage, name, version)}/{stamp}-{uuid.uuid4().hex[:6]}.html"
    storage.create(path, page.encode())
    return storage.to_uri(path)
