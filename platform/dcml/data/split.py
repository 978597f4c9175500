"""Seeded row hashes: the deterministic train/validation/test split and duplicate detection.

A row's split depends only on its id (or, without an id column, on its content) and the seed, so
the same row lands in the same split whatever the shard layout, block size or number of workers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "validation", "test")
_KEY = "dcml-split-hash0"  # pandas' siphash key for strings: 16 characters


def hash64(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit hash per value (numbers hashed by value, anything else as a string)."""
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        h = pd.util.hash_array(values.astype(np.int64), categorize=False)
    elif values.dtype.kind == "f":
        h = pd.util.hash_array(values.astype(np.float64), categorize=False)
    else:  # strings (None allowed)
        h = pd.util.hash_array(values.astype(object), hash_key=_KEY, categorize=False)
    salt = pd.util.hash_array(np.array([seed], dtype=np.int64), categorize=False)[0]
    return pd.util.hash_array(h ^ salt, categorize=False)


def hash_text(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """hash64 of an Arrow text column, hashing each distinct value once (nulls hash alike)."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks() if encoded.num_chunks else pa.array([], encoded.type)
    distinct = hash64(encoded.dictionary.to_numpy(zero_copy_only=False))
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return np.where(indices >= 0, distinct[np.maximum(indices, 0)], np.uint64(0x9E3779B97F4A7C15))


def combine(hashes: list[np.ndarray]) -> np.ndarray:
    """One hash per row from per-column hashes (order matters)."""
    out = np.zeros(len(hashes[0]), dtype=np.uint64)
    for h in hashes:
        out = (out ^ h) * np.uint64(0x100000001B3)  # FNV-style mixing; wraps around
    return pd.util.hash_array(out, categorize=False)


def unit_interval(hashes: np.ndarray) -> np.ndarray:
    return (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(u: np.ndarray, fractions: dict[str, float]) -> np.ndarray:
    """Uniform hash values in [0, 1) -> split codes (0 train, 1 validation, 2 test; see SPLITS)."""
    cut_train = fractions["train"]
    cut_val = cut_train + fractions["validation"]
    return (u >= cut_train).astype(np.int8) + (u >= cut_val).astype(np.int8)
