"""Deterministic train/validation/test split by a seeded hash of the row id.

The same id lands in the same split whatever the shard layout, block size or number of workers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "validation", "test")


def assign_splits(ids: np.ndarray, seed: int, fractions: dict[str, float]) -> np.ndarray:
    key = f"dcml{seed:012d}"[-16:]  # pandas' siphash takes a 16-character key
    hashed = pd.util.hash_array(np.asarray(ids).astype(str).astype(object), hash_key=key)
    u = hashed.astype(np.float64) / 2.0**64
    cut_train = fractions["train"]
    cut_val = cut_train + fractions["validation"]
    return np.where(u < cut_train, "train", np.where(u < cut_val, "validation", "test"))
