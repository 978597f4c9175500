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
from dcml.train.loop import WEIGHTS, predict_proba
from dcml.train.model import build_model

MODEL_JSON = "model.json"


class Predictor:
    def __init__(self, weights: bytes, meta: dict[str, Any], device: str = "cpu"):
        self.meta = meta
        self.preprocessor = Preprocessor.from_json(meta["preprocessor"])
        self.inputs: list[str] = self.preprocessor.inputs  # raw columns a record must hold
        self.classes: list[Any] = meta.get("classes") or [0, 1]
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
        with storage.fs.open(f"{path}/{WEIGHTS}", "rb") as f:
            weights = f.read()
        return cls(weights, storage.read_json(f"{path}/{MODEL_JSON}"), device)

    @property
    def version(self) -> str:
        return f"{self.meta.get('name')}@{self.meta.get('version')}"

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Already-transformed features -> positive-class probabilities."""
        return predict_proba(
            self.model, torch.as_tensor(x, dtype=torch.float32, device=self.device)
        )

    def predict_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Raw feature columns by name -> probabilities, with the training preprocessor."""
        return self.predict_features(self.preprocessor.transform(columns))

    def labels(self, probs: np.ndarray) -> list[Any]:
        """Positive-class probabilities -> class labels as the data spelled them."""
        return [self.classes[int(p >= self.threshold)] for p in probs]

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        columns: dict[str, Any] = {  # None (missing) becomes NaN, imputed by the preprocessor
            c: np.array([r[c] for r in records], dtype=np.float64)
            for c in self.preprocessor.numeric
        }
        columns.update({c: [r[c] for r in records] for c in self.preprocessor.categorical})
        probs = self.predict_columns(columns)
        return [
            {
                "label": label,
                "probability": float(p),
                "model_version": self.version,
            }
            for p, label in zip(probs, self.labels(probs), strict=True)
        ]
