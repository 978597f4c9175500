"""The run report: one self-contained HTML file per pipeline run, at `runs/<run_id>/report.html`.

It gathers what the stages already stored (the dataset's manifest and gate report, the run's config,
history, test metrics and plots, the sweep's trials and plots, the registered and served model) into
one page: images as base64 `data:` URIs, inline CSS, no scripts and no links to fetch, every text
HTML-escaped, so the file can be opened from anywhere. A section whose inputs are absent says so.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import time
from typing import TYPE_CHECKING, Any

from dcml.config_model import family_fields
from dcml.layout import (
    HISTORY,
    PLOTS,
    REPORT,
    RESULT_PLOTS,
    RUN_JSON,
    TEST_METRICS,
    TRIAL_RESULTS,
    read_trial_results,
    run_folder,
)
from dcml.storage import Storage

if TYPE_CHECKING:  # `dcml report` only looks a report up: it starts without torch and Ray
    from dcml.data.catalog import DatasetVersion
    from dcml.registry import ModelVersion

PNG = b"\x89PNG\r\n\x1a\n"
HISTORY_HIDDEN = ("time",)  # wall-clock stamps: noise in a table

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222;
       padding: 0 1rem; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.2rem; }
h3 { margin-bottom: 0.4rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { max-height: 28rem; max-width: 100%; overflow: auto; display: inline-block; }
.pass { color: #176f2c; font-weight: 600; }
.fail { color: #b00020; font-weight: 600; }
.muted { color: #666; }
figure { display: inline-block; margin: 0.5rem 1rem 0.5rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #666; }
.cols { display: flex; flex-wrap: wrap; gap: 2rem; }
code { font-size: 0.85rem; }
"""


def report_path(storage: Storage, run_id: str) -> str:
    return f"{run_folder(storage, run_id)}/{REPORT}"


def write_report(
    storage: Storage,
    run_id: str,
    *,
    dataset: DatasetVersion | None = None,
    sweep_id: str | None = None,
    model: ModelVersion | None = None,
    served: ModelVersion | None = None,
    url: str | None = None,
    served_metrics: dict[str, float] | None = None,
) -> str:
    """Write runs/<run_id>/report.html from what the run stored and what the caller passes; its
    URI. The dataset defaults to the one in the run's run.json."""
    from dcml.data.catalog import resolve_dataset

    run = run_folder(storage, run_id)
    record = _read_json(storage, f"{run}/{RUN_JSON}")
    if dataset is None and record.get("dataset"):
        try:
            dataset = resolve_dataset(storage, record["dataset"])
        except LookupError:
            dataset = None
    sweep = run_folder(storage, sweep_id) if sweep_id else None
    sections = [
        _winner_section(storage, model, run_id),
        _dataset_section(dataset, record.get("dataset")),
        _training_section(storage, run, run_id, record),
        _tuning_section(storage, sweep, sweep_id),
        _test_section(storage, run),
        _model_section(storage, model, served, url, served_metrics),
    ]
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    summary = [("run", run_id), ("outputs", storage.to_uri(run)), ("written", created)]
    if dataset is not None:
        summary.insert(1, ("dataset", dataset.ref))
    if model is not None:
        summary.insert(2, ("registered model", model.ref))
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(f'dcml run {run_id}')}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>dcml run report: {_e(run_id)}</h1>\n{_kv(summary)}\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    path = report_path(storage, run_id)
    storage.write_text(path, page)
    return storage.to_uri(path)


# --- sections ------------------------------------------------------------------------------------


def _dataset_section(dataset: DatasetVersion | None, ref: str | None) -> str:
    head = "<h2>Dataset</h2>"
    if dataset is None:
        what = f"dataset {ref} not found" if ref else "no dataset recorded for this run"
        return f'{head}<p class="muted">{_e(what)}.</p>'
    m = dataset.manifest
    rows = m.get("rows", {})
    cols = m.get("columns", {})
    created = m.get("created_at")
    fmt = m.get("format")
    facts = [
        ("version", dataset.ref),
        ("source", f"{m.get('source', '?')} ({len(m.get('source_files', []))} {fmt} file(s))"),
        ("task", m.get("task", "?") + (f", classes {m['classes']}" if m.get("classes") else "")),
        ("rows", f"{rows.get('raw', '?')} raw; augmented {rows.get('augmented', 0)}"),
        (
            "inputs",
            f"{len(cols.get('numeric', []))} numeric, {len(cols.get('categorical', []))} "
            f"categorical -> {len(m.get('features', []))} model features",
        ),
        ("content hash", m.get("content_hash", "")),
        (
            "created",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created)) if created else "",
        ),
    ]
    splits = [(s, rows.get(s, "")) for s in ("train", "validation", "test")]
    if m.get("class_counts"):
        splits = [(s, f"{n} (per class {m['class_counts'].get(s)})") for s, n in splits]
    dropped = [(why, n) for why, n in rows.get("dropped", {}).items()]
    out = [
        head,
        _kv(facts),
        '<div class="cols"><div><h3>Splits (rows)</h3>',
        _kv(splits),
        "</div><div><h3>Dropped rows by reason</h3>",
        _kv(dropped) if dropped else '<p class="muted">none</p>',
        "</div></div>",
        _gate(m.get("gate")),
    ]
    return "\n".join(out)


def _gate(gate: dict[str, Any] | None) -> str:
    if not gate:
        return '<h3>Validation gate</h3><p class="muted">no gate report stored.</p>'
    verdict = "passed" if gate.get("passed") else "FAILED"
    rows = []
    for i, checks in enumerate(gate.get("rounds", [])):
        for c in checks:
            detail = c.get("detail", "")
            if c.get("examples") and not c.get("passed"):
                detail += "; e.g. " + ", ".join(
                    f"{e.get('file')} row {e.get('row')} (id {e.get('id')})" for e in c["examples"]
                )
            result = _pass(bool(c.get("passed")))
            rows.append([i, c.get("check", ""), result, c.get("column") or "", detail])
    return (
        f'<h3>Validation gate: <span class="{"pass" if gate.get("passed") else "fail"}">'
        f"{verdict}</span></h3>"
        f"<p>{_e(len(gate.get('rounds', [])))} round(s); repairs dropped "
        f"{_e(gate.get('dropped_rows', 0))} row(s) and imputed {_e(gate.get('imputed_values', 0))} "
        "value(s).</p>" + _table(["round", "check", "result", "column", "detail"], rows)
    )


def _training_section(storage: Storage, run: str, run_id: str, record: dict[str, Any]) -> str:
    head = "<h2>Training</h2>"
    if not storage.exists(run):
        return f'{head}<p class="muted">not run: no folder {_e(storage.to_uri(run))}.</p>'
    out = [head, f"<p>run <code>{_e(run_id)}</code> at <code>{_e(storage.to_uri(run))}</code></p>"]
    config = family_fields(record.get("config") or {})
    tables = [
        f"<div><h3>{name}</h3>{_kv(sorted(config[name].items()))}</div>"
        for name in ("model", "train")
        if isinstance(config.get(name), dict)
    ]
    if tables:
        out.append(
            f'<p>seed {_e(config.get("seed", "?"))}</p><div class="cols">{"".join(tables)}</div>'
        )
    out.append("<h3>Learning curves</h3>")
    out.append(_image(storage, f"{run}/{PLOTS}/learning_curves.png", "Learning curves"))
    history = _read_csv(storage, f"{run}/{HISTORY}")
    if history:
        columns = [c for c in history[0] if c not in HISTORY_HIDDEN]
        title = "History (per epoch)"
        if "round" in columns:  # gbdt: a round per row, at most 50 rows shown
            columns.remove("epoch")
            step = -(-len(history) // 50)
            if step > 1:  # the first, every step-th, the best and the last rounds
                title = f"History (every {step} boosting rounds; history.csv has each)"
                train = (record.get("config") or {}).get("train") or {}
                values = [h.get(train.get("metric"), 0) for h in history]
                best = values.index((max if train.get("mode") == "max" else min)(values))
                keep = {0, len(history) - 1, best}
                history = [h for i, h in enumerate(history) if (i + 1) % step == 0 or i in keep]
            else:
                title = "History (per boosting round)"
        rows = [[_from_one(r[c]) if c == "epoch" else r[c] for c in columns] for r in history]
        out.append(f'<h3>{title}</h3><div class="scroll">')
        out.append(_table(columns, rows) + "</div>")
    else:
        out.append('<p class="muted">no history.csv stored.</p>')
    return "\n".join(out)


def _tuning_section(storage: Storage, sweep: str | None, sweep_id: str | None) -> str:

    head = "<h2>Tuning</h2>"
    if sweep is None:
        return f'{head}<p class="muted">not run (no sweep in this pipeline run).</p>'
    trials = _read_csv(storage, f"{sweep}/trials.csv")
    if not trials:
        return (
            f'{head}<p class="muted">sweep {_e(sweep_id)}: no trials.csv under '
            f"{_e(storage.to_uri(sweep))}.</p>"
        )
    tune = (_read_json(storage, f"{sweep}/{RUN_JSON}").get("config") or {}).get("tune") or {}
    shown = ("searcher", "scheduler", "num_samples", "epochs", "grace_period", "space")
    out = [
        head,
        f"<p>sweep <code>{_e(sweep_id)}</code> at <code>{_e(storage.to_uri(sweep))}</code>; "
        f"{len(trials)} trial(s), best first</p>",
    ]
    if tune:
        out.append(_kv([(k, tune[k]) for k in shown if k in tune]))
    out.append(_table(list(trials[0]), [list(t.values()) for t in trials]))
    out.append(_image(storage, f"{sweep}/{PLOTS}/metric_by_param.png", "Metric by parameter"))
    out.append(_image(storage, f"{sweep}/{PLOTS}/trial_curves.png", "Trial curves"))
    return "\n".join(out)


def _test_section(storage: Storage, run: str) -> str:

    head = "<h2>Test metrics</h2>"
    metrics = _read_json(storage, f"{run}/{TEST_METRICS}")
    if not metrics:
        return f'{head}<p class="muted">not run: no {TEST_METRICS} in the run.</p>'
    checkpoint = metrics.pop("checkpoint", None)
    out = [head, "<p>The run's best checkpoint on the test split"]
    if checkpoint:
        out[-1] += f" (<code>{_e(storage.to_uri(checkpoint))}</code>)"
    out[-1] += ".</p>"
    out.append(_kv(sorted(metrics.items())))
    # the plots that fit the task: those the run stored
    stored = set(storage.ls(f"{run}/{PLOTS}"))
    shown = [
        _image(storage, f"{run}/{PLOTS}/{n}", c) for n, c in RESULT_PLOTS.items() if n in stored
    ]
    out += shown or ['<p class="muted">no plots of the test split stored.</p>']
    return "\n".join(out)


def _model_section(
    storage: Storage,
    model: ModelVersion | None,
    served: ModelVersion | None,
    url: str | None,
    served_metrics: dict[str, float] | None,
) -> str:
    out = ["<h2>Registered model</h2>"]
    if model is None:
        out.append('<p class="muted">not registered.</p>')
    else:
        meta, spec = model.meta, model.meta.get("model_spec", {})
        lineage = meta.get("lineage", {})
        kind = f"gbdt, {spec.get('rounds')} rounds" if spec.get("kind") == "gbdt" else "mlp"
        facts = [("version", model.ref), ("model", kind), ("stored at", storage.to_uri(model.path))]
        out.append(_kv([*facts, *[(f"lineage: {k}", v) for k, v in sorted(lineage.items())]]))
        test = meta.get("metrics", {})
        validation = {
            k: v for k, v in meta.get("validation_metrics", {}).items() if k.startswith("val_")
        }
        tables = [
            f"<div><h3>{_e(title)}</h3>{_kv(sorted(metrics.items()))}</div>"
            for title, metrics in (("Test split", test), ("Validation split", validation))
            if metrics
        ]
        if tables:
            out.append(f'<div class="cols">{"".join(tables)}</div>')
        if roc := meta.get("test_roc"):
            from dcml.plots import roc_at_threshold

            t, policy = meta.get("threshold", 0.5), meta.get("threshold_policy", "0.5")
            png = roc_at_threshold(roc, t, test.get("test_roc_auc", float("nan")))
            caption = f"test ROC curve; the decision threshold {t:.3f} ({policy}) marked"
            out.append(_png_figure(png, caption))
    out.append("<h2>Served model</h2>")
    if served is None and not url:
        out.append('<p class="muted">not served.</p>')
        return "\n".join(out)
    facts = []
    if served is not None:
        facts.append(("version", served.ref))
    if url:
        facts.append(("endpoint", f"{url}/predict"))
    out.append(_kv(facts))
    if served_metrics:
        out.append("<h3>Served model on the test split, over HTTP</h3>")
        out.append(_kv(sorted(served_metrics.items())))
    return "\n".join(out)


def _winner_section(storage: Storage, model: ModelVersion | None, run_id: str) -> str:
    """When the registered model came from a sweep's trial, not from this run: which one, its
    parameters and its learning curves (from the trial's result.json; a gbdt trial's per-round
    history from its checkpoint), at the top."""
    lineage = (model.meta.get("lineage", {}) if model is not None else {}) or {}
    sweep_id, checkpoint = lineage.get("sweep_id"), lineage.get("checkpoint", "")
    if not sweep_id or lineage.get("run_id") == run_id:
        return ""
    trial = checkpoint.rstrip("/").rsplit("/", 2)[-2] if "/" in checkpoint else ""
    metric = model.meta.get("config", {}).get("train", {}).get("metric", "val_loss")
    out = [
        "<h2>The registered model came from the sweep</h2>",
        f'<p class="note">{_e(model.ref)} is the best trial of sweep <code>{_e(sweep_id)}</code>, '
        f"not this run {_e(run_id)}: its trial and curves first; this run's follow.</p>",
        _kv([("trial", trial), *sorted((k, v) for k, v in lineage.get("params", {}).items())]),
    ]
    folder = checkpoint.rstrip("/").rsplit("/", 1)[0]
    history = read_trial_results(storage, folder) if trial else []
    spec = model.meta.get("model_spec", {})
    if spec.get("kind") == "gbdt":  # its reports hold best-so-far values: draw every round
        history = _read_csv(storage, f"{checkpoint}/{HISTORY}") or history
    if history:
        from dcml.plots import learning_curves

        figure = learning_curves(history, metric, spec.get("rounds"))
        out.append(_png_figure(figure, f"trial {trial}: learning curves"))
    else:
        out.append(f'<p class="muted">trial {_e(trial)}: no {TRIAL_RESULTS} stored.</p>')
    return "\n".join(out)


# --- HTML pieces ---------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(_fmt(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, _Raw):
        return f"<td>{value}</td>"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f'<td class="num">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _kv(pairs: list[tuple[Any, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th>{_cell(v)}</tr>" for k, v in pairs)
    return f"<table>{body}</table>"


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Markup made here from escaped text: put into a cell as it is."""


def _pass(passed: bool) -> _Raw:
    return _Raw('<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>')


def _from_one(epoch: Any) -> Any:
    """Epochs as the logs and plots count them: from 1."""
    return epoch + 1 if isinstance(epoch, int | float) else epoch


def _image(storage: Storage, path: str, caption: str) -> str:
    data = _read_bytes(storage, path)
    if not data or not data.startswith(PNG):
        return f'<p class="muted">{_e(caption)}: no plot stored.</p>'
    return _png_figure(data, caption)


def _png_figure(data: bytes, caption: str) -> str:
    """A PNG as a figure embedded in the page."""
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{src}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


# --- storage -------------------------------------------------------------------------------------


def _read_bytes(storage: Storage, path: str) -> bytes | None:
    if not storage.exists(path):
        return None
    with storage.fs.open(path, "rb") as f:
        return f.read()


def _read_json(storage: Storage, path: str) -> dict[str, Any]:
    data = _read_bytes(storage, path)
    return json.loads(data) if data else {}


def _read_csv(storage: Storage, path: str) -> list[dict[str, str]]:
    data = _read_bytes(storage, path)
    if not data:
        return []
    rows = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    return [{k: _parse(v) for k, v in row.items()} for row in rows]


NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-?inf|nan")


def _parse(text: str) -> Any:
    """A CSV cell as a number where it is one (for alignment and formatting), else the text."""
    if not NUMBER.fullmatch(text or ""):
        return text
    return int(text) if text.lstrip("-").isdigit() else float(text)
