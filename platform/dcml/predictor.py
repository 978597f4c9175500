"""Raw records -> predictions, for Serve and batch inference alike. Needs torch, not Ray."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dcml.data.transforms import Preprocessor
from dcml.layout import MODEL_JSON, model_file, read_weights
from dcml.train.model import model_from_bytes
from dcml.train.step import predict


class Predictor:
    def __init__(self, weights: bytes, meta: dict[str, Any], device: str = "cpu"):
        """`weights`: the model file's bytes (an MLP's safetensors or a gbdt booster's UBJSON,
        as `meta["model_spec"]` says)."""
        self.meta = meta
        self.preprocessor = Preprocessor.from_json(meta["preprocessor"])
        self.inputs: list[str] = self.preprocessor.inputs  # raw columns a record must hold
        self.task: str = meta.get("task", "binary")
        self.classes: list[Any] | None = meta.get("classes") or (
            [0, 1] if self.task == "binary" else None
        )
        self.threshold: float = meta.get("threshold", 0.5)
        self.device = torch.device(device)
        # rows per forward pass: a GPU takes larger ones (its activations stay on the device)
        self.chunk_rows = 65_536 if self.device.type == "cuda" else 8192
        self.model = model_from_bytes(meta["model_spec"], weights)  # no pickle
        self.model.to(self.device).eval()

    @classmethod
    def from_dir(cls, path: str, device: str = "cpu") -> Predictor:
        """Load from a local model version folder (no Ray, no fsspec needed)."""
        with open(os.path.join(path, MODEL_JSON)) as f:
            meta = json.load(f)
        with open(os.path.join(path, model_file(meta["model_spec"])), "rb") as f:
            return cls(f.read(), meta, device)

    @classmethod
    def from_storage(cls, storage, path: str, device: str = "cpu") -> Predictor:
        """Load a registered version, refusing weights whose size or SHA-256 differ from those
        its model.json lists (hashing a small model's weights takes milliseconds)."""
        import hashlib

        from dcml.storage import DamagedError, lists_files

        meta = storage.read_json(f"{path}/{MODEL_JSON}")
        name = model_file(meta["model_spec"])
        weights = read_weights(storage, path, meta["model_spec"])
        listed = {e["path"]: e for e in meta.get("files", [])}
        entry = listed.get(name)
        if lists_files(meta) and (
            entry is None
            or entry["bytes"] != len(weights)
            or entry["sha256"] != hashlib.sha256(weights).hexdigest()
        ):
            raise DamagedError(
                f"{storage.to_uri(f'{path}/{name}')} is not the file its model.json lists "
                "(altered or partly written); not loading it"
            )
        return cls(weights, meta, device)

    @property
    def version(self) -> str:
        return f"{self.meta.get('name')}@{self.meta.get('version')}"

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Already-transformed features -> P(positive) (binary), class probabilities (rows,
        classes; multiclass) or values (regression). On a GPU the batch goes through pinned
        host memory, from which the copy to the device is a DMA transfer that does not block."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return predict(self.model, t, self.task, self.chunk_rows)

    def predict_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Raw feature columns by name -> model outputs, with the training preprocessor."""
        return self.predict_features(self.preprocessor.transform(columns))

    def score(
        self, x: np.ndarray, raw: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
        """Transformed features -> (model outputs, the rows that cannot be scored). Such a row
        is never answered: {row: {"field": input column or None, "msg": why}}. A feature is NaN
        where a value is missing in a column whose missing rows training dropped (it has no
        fill), and infinite where a value is beyond float32 once scaled; a finite but extreme
        input can still drive the model's output to inf or NaN. `raw`: the numeric columns
        before the preprocessor (which clips an infinite value to its bound): inf there is
        refused too, as Serve's request validation refuses it."""
        out = self.predict_features(x)
        problems: dict[int, dict[str, Any]] = {}
        numeric = self.preprocessor.numeric  # the first features, in order
        if raw is not None:
            for row in np.flatnonzero(np.isinf(raw).any(axis=1)).tolist():
                j = int(np.argmax(np.isinf(raw[row])))
                problems[row] = {"field": numeric[j], "msg": "not a finite number"}
        bad_x = ~np.isfinite(x)
        if bad_x.any():
            for row in np.flatnonzero(bad_x.any(axis=1)).tolist():
                if row in problems:
                    continue
                j = int(np.argmax(bad_x[row]))
                field = numeric[j] if j < len(numeric) else None
                if np.isnan(x[row, j]):
                    msg = "missing, and rows missing it were dropped in training: send a number"
                else:
                    msg = "too large in magnitude: beyond float32 once scaled"
                problems[row] = {"field": field, "msg": msg}
        finite = np.isfinite(out)
        bad_out = ~(finite if finite.ndim == 1 else finite.all(axis=1))
        for row in np.flatnonzero(bad_out).tolist():
            problems.setdefault(row, {"field": None, "msg": "the model's output is not finite"})
        return out, problems

    def class_indices(self, out: np.ndarray) -> np.ndarray:
        """Model outputs -> each row's class, as an index into `classes`."""
        if self.task == "multiclass":
            return np.argmax(out, axis=1)
        return (out >= self.threshold).astype(np.int64)

    def labels(self, out: np.ndarray) -> list[Any]:
        """Model outputs -> class labels as the data spelled them (values for regression)."""
        if self.task == "regression":
            return out.astype(np.float64).tolist()
        return np.asarray(self.classes, dtype=object)[self.class_indices(out)].tolist()

    def answer(
        self, out: np.ndarray, problems: Mapping[int, dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """One response record per row: the label (or value) and its probability, or for a row
        in `problems`, its `error` (never a label made up from a NaN)."""
        rows = []
        problems = problems or {}
        for i, (o, label) in enumerate(zip(out, self.labels(out), strict=True)):
            row: dict[str, Any]
            if i in problems:
                row = {"error": problems[i]}
            elif self.task == "binary":
                row = {"label": label, "probability": float(o)}
            elif self.task == "multiclass":
                row = {"label": label, "probability": float(np.max(o))}
                row["probabilities"] = {str(c): float(p) for c, p in zip(self.classes, o)}
            else:
                row = {"value": label}
            rows.append({**row, "model_version": self.version})
        return rows

    def predict_records(
        self, records: Sequence[Mapping[str, Any]], seen: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Answers for raw records. `seen` gets what the call saw: per column the missing values
        and unseen categories (see Preprocessor.transform), and `outputs`, the model's outputs
        of the rows it answered."""
        pre = self.preprocessor
        # one array for all numeric columns; None (missing) becomes NaN, imputed by the preprocessor
        matrix = np.array([[r[c] for c in pre.numeric] for r in records], dtype=np.float64)
        matrix = matrix.reshape(len(records), len(pre.numeric))
        columns = {c: [r[c] for r in records] for c in pre.categorical}
        out, problems = self.score(pre.transform(columns, numeric=matrix, seen=seen))
        if seen is not None:
            seen["outputs"] = np.delete(out, list(problems), axis=0) if problems else out
        return self.answer(out, problems)
