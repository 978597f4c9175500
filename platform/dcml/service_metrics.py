"""A served model's metrics, through Ray Serve's metrics API (`ray.serve.metrics`): each replica
records them, Ray's metrics agent on its node exports them in Prometheus format (`/metrics` on
the node's metrics export port, names prefixed `ray_`), and Ray's dashboard shows them. Serve
adds the deployment, replica and application tags; dcml adds the model's name and version.
docs/monitoring.md lists them, with a Grafana dashboard."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np

from dcml.data.columns import class_key
from dcml.data.reference import decile_bins

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_RECORDS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
VERSION = ("model", "version")
# name: (kind, the labels besides model and version, what it counts). What Prometheus shows:
# Ray prefixes `ray_`; counters end in `_total`, histograms in `_bucket`, `_count` and `_sum`.
EXPORTED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "dcml_requests": ("counter", ("code",), "Requests to /predict by status code."),
    "dcml_request_latency_ms": (
        "histogram",
        (),
        "Time from a /predict request's arrival to its answer (ms).",
    ),
    "dcml_batch_records": ("histogram", (), "Records per model call (requests batched together)."),
    "dcml_records_scored": ("counter", (), "Records the model scored."),
    "dcml_predictions": ("counter", ("class",), "Predicted classes."),
    "dcml_prediction_deciles": (
        "counter",
        ("decile",),
        "Regression: predictions by decile of the values the version predicted on its test "
        "split (each takes a tenth while traffic looks like the test split).",
    ),
    "dcml_missing_values": (
        "counter",
        ("column",),
        "Missing values, imputed or bucketed, by column.",
    ),
    "dcml_unknown_categories": ("counter", ("column",), "Categories not seen in training."),
    "dcml_prediction_log_dropped": (
        "counter",
        (),
        "Sampled records the prediction log dropped (its buffer full, or storage failing).",
    ),
}
BOUNDARIES = {"dcml_request_latency_ms": LATENCY_MS, "dcml_batch_records": BATCH_RECORDS}


class ServiceMetrics:
    """The served model's metrics. Histograms are recorded as they happen; counters are summed
    here and handed to Ray once a second (Ray exports every 10 s), so that a request costs a
    dict update rather than a call into Ray's metrics."""

    def __init__(self, flush_s: float = 1.0) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.made: dict[str, Any] = {}
        for name, (kind, keys, doc) in EXPORTED.items():
            if kind == "counter":
                self.made[name] = Counter(name, doc, tag_keys=(*VERSION, *keys))
            else:
                self.made[name] = Histogram(name, doc, BOUNDARIES[name], tag_keys=(*VERSION, *keys))
        self._tags: dict[str, dict[str, str]] = {}
        # (counter, model version, its own label's value or None) -> the count since the last flush
        self._counts: dict[tuple[str, str, str | None], float] = defaultdict(float)
        # (histogram, model version) -> its recorder and tags (see `_observe`)
        self._fast: dict[tuple[str, str], tuple[Any, dict[str, str]]] = {}
        self._lock = threading.Lock()
        self.flush_s = flush_s
        threading.Thread(target=self._run, name="dcml-metrics", daemon=True).start()

    def tags(self, predictor: Any) -> dict[str, str]:
        version = predictor.version
        if version not in self._tags:
            m = predictor.meta
            self._tags[version] = {"model": str(m.get("name")), "version": str(m.get("version"))}
        return self._tags[version]

    def _count(self, name: str, predictor: Any, n: float, label: str | None = None) -> None:
        self.tags(predictor)
        with self._lock:
            self._counts[(name, predictor.version, label)] += n

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_s)
            self.flush()

    def flush(self) -> None:
        """Hand the counts summed since the last flush to Ray."""
        with self._lock:
            counts, self._counts = self._counts, defaultdict(float)
        for (name, version, label), n in counts.items():
            keys = EXPORTED[name][1]
            tags = self._tags[version] | ({keys[0]: label} if keys else {})
            self.made[name].inc(n, tags)

    def request(self, predictor: Any, status: int, seconds: float) -> None:
        self._count("dcml_requests", predictor, 1, str(status))
        self._observe("dcml_request_latency_ms", predictor, seconds * 1000)

    def _observe(self, name: str, predictor: Any, value: float) -> None:
        """Record a histogram value now, through Ray's recorder with tags merged once per
        version: `Histogram.observe` merges and checks them per call, and that Python, between
        the event loop's own work, cost a replica ~40 us per value under load."""
        key = (name, predictor.version)
        fast = self._fast.get(key)
        if fast is None:
            histogram = self.made[name]
            tags = histogram._get_final_tags(dict(self.tags(predictor)))
            recorder = getattr(histogram, "_metric", None)
            if recorder is not None and hasattr(recorder, "record"):
                fast = self._fast[key] = (recorder.record, tags)
            else:  # another Ray: its public call
                fast = self._fast[key] = (lambda v, tags: histogram.observe(v, tags), tags)
        record, tags = fast
        record(value, tags=tags)

    def scored(self, predictor: Any, records: int, seen: dict[str, Any]) -> None:
        """One model call: its size, its outputs, and what its inputs lacked."""
        self._observe("dcml_batch_records", predictor, records)
        out = seen.get("outputs")
        if out is not None and len(out):
            self._count("dcml_records_scored", predictor, len(out))
            if predictor.task == "regression":
                edges = decile_edges(predictor.meta.get("reference_predictions"))
                if edges is not None:  # (-inf, e1], (e1, e2], ...: as `dcml monitor` bins them
                    bins = np.searchsorted(edges, out, side="left")
                    counts = np.bincount(bins, minlength=len(edges) + 1)
                    for d, n in enumerate(counts.tolist(), start=1):
                        if n:
                            self._count("dcml_prediction_deciles", predictor, n, str(d))
            else:
                indices = predictor.class_indices(out)
                counts = np.bincount(indices, minlength=len(predictor.classes))
                for label, n in zip(predictor.classes, counts.tolist()):
                    if n:
                        self._count("dcml_predictions", predictor, n, class_key(label))
        for column, n in seen.get("missing", {}).items():
            self._count("dcml_missing_values", predictor, n, column)
        for column, n in seen.get("unknown", {}).items():
            self._count("dcml_unknown_categories", predictor, n, column)

    def dropped(self, predictor: Any, n: int) -> None:
        self._count("dcml_prediction_log_dropped", predictor, n)


def decile_edges(reference: dict[str, Any] | None) -> np.ndarray | None:
    """The edges of a stored distribution's decile bins (None: none stored)."""
    if not reference or not reference.get("points"):
        return None
    return decile_bins(reference)[0]
