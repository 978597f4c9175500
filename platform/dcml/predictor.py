"""Raw records -> predictions, for Serve and batch inference alike. Needs torch, not Ray."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from dcml.data.transforms import Preprocessor
from dcml.layout import MODEL_JSON, WEIGHTS, read_weights
from dcml.train.model import build_model
from dcml.train.step import predict


class Predictor:
    def __init__(self, weights: bytes, meta: dict[str, Any], device: str = "cpu"):
        self.meta = meta
        self.preprocessor = Preprocessor.from_json(meta["preprocessor"])
        self.inputs: list[str] = self.preprocessor.inputs  # raw columns a record must hold
        self.task: str = meta.get("task", "binary")
        self.classes: list[Any] | None = meta.get("classes") or (
            [0, 1] if self.task == "binary" else None
        )
        self.threshold: float = meta.get("threshold", 0.5)
        self.device = torch.device(device)
        self.model = build_model(meta["model_spec"])
        self.model.load_state_dict(load_safetensors(weights))  # safetensors: no pickle
        self.model.to(self.device).eval()

    @classmethod
    def from_dir(cls, path: str, device: str = "cpu") -> Predictor:
        """Load from a local model version folder (no Ray, no fsspec needed)."""
        with open(os.path.join(path, WEIGHTS), "rb") as f:
            weights = f.read()
        with open(os.path.join(path, MODEL_JSON)) as f:
            return cls(weights, json.load(f), device)

    @classmethod
    def from_storage(cls, storage, path: str, device: str = "cpu") -> Predictor:
        """Load a registered version, refusing weights whose size or SHA-256 differ from those
        its model.json lists (hashing a small model's weights takes milliseconds)."""
        import hashlib

        from dcml.storage import DamagedError, lists_files

        meta = storage.read_json(f"{path}/{MODEL_JSON}")
        weights = read_weights(storage, path)
        listed = {e["path"]: e for e in meta.get("files", [])}
        entry = listed.get(WEIGHTS)
        if lists_files(meta) and (
            entry is None
            or entry["bytes"] != len(weights)
            or entry["sha256"] != hashlib.sha256(weights).hexdigest()
        ):
            raise DamagedError(
                f"{storage.to_uri(f'{path}/{WEIGHTS}')} is not the file its model.json lists "
                "(altered or partly written); not loading it"
            )
        return cls(weights, meta, device)

    @property
    def version(self) -> str:
        return f"{self.meta.get('name')}@{self.meta.get('version')}"

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Already-transformed features -> P(positive) (binary), class probabilities (rows,
        classes; multiclass) or values (regression)."""
        return predict(
            self.model, torch.as_tensor(x, dtype=torch.float32, device=self.device), self.task
        )

    def predict_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Raw feature columns by name -> model outputs, with the training preprocessor."""
        return self.predict_features(self.preprocessor.transform(columns))

    def labels(self, out: np.ndarray) -> list[Any]:
        """Model outputs -> class labels as the data spelled them (values for regression)."""
        if self.task == "regression":
            return [float(v) for v in out]
        if self.task == "multiclass":
            return [self.classes[int(k)] for k in np.argmax(out, axis=1)]
        return [self.classes[int(p >= self.threshold)] for p in out]

    def answer(self, out: np.ndarray) -> list[dict[str, Any]]:
        """One response record per row: the label (or value) and its probability."""
        rows = []
        for o, label in zip(out, self.labels(out), strict=True):
            row: dict[str, Any]
            if self.task == "binary":
                row = {"label": label, "probability": float(o)}
            elif self.task == "multiclass":
                row = {"label": label, "probability": float(np.max(o))}
                row["probabilities"] = {str(c): float(p) for c, p in zip(self.classes, o)}
            else:
                row = {"value": label}
            rows.append({**row, "model_version": self.version})
        return rows

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        pre = self.preprocessor
        # one array for all numeric columns; None (missing) becomes NaN, imputed by the preprocessor
        matrix = np.array([[r[c] for c in pre.numeric] for r in records], dtype=np.float64)
        matrix = matrix.reshape(len(records), len(pre.numeric))
        columns = {c: [r[c] for r in records] for c in pre.categorical}
        return self.answer(self.predict_features(pre.transform(columns, numeric=matrix)))
