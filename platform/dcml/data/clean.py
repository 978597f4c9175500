"""Reading and cleaning raw files: one Ray Data task per file.

Each file becomes a table of typed columns plus bookkeeping: `_split` (0 train, 1 validation,
2 test) and `_u` (the seeded hash that picks it), `_dup` (the hash that finds duplicates),
`_file`/`_row` (where the row came from, for error messages and the gate's examples) and `_drop`
(why a row will be dropped, 0 to keep it).
Rows are marked, not removed, so that every removal is counted by reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dcml.data.columns import Columns, class_key, is_categorical, is_numeric
from dcml.data.errors import DataError
from dcml.data.sources import read_file
from dcml.data.split import assign_splits, combine, hash64, hash_text, unit_interval

KEEP, MISSING_LABEL, INVALID_LABEL, MISSING_VALUE, MISSING_ID, DUPLICATE = range(6)
DROP_REASONS = {
    MISSING_LABEL: "missing_label",
    INVALID_LABEL: "invalid_label",
    MISSING_VALUE: "missing_value",
    MISSING_ID: "missing_id",
    DUPLICATE: "duplicate",
}
NULL_TEXT = {"", "na", "n/a", "nan", "null", "none", "#n/a"}


def to_float(col: pa.ChunkedArray, where: str, name: str) -> np.ndarray:
    """A numeric column as float64 (missing -> NaN); text that is not a number is an error."""
    t = col.type
    if is_numeric(t) or pa.types.is_boolean(t):
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        text = pd.Series(pc.cast(col, pa.string()).to_pylist(), dtype=object)
        values = pd.to_numeric(text, errors="coerce")
        blank = text.isna() | text.astype(str).str.strip().str.lower().isin(NULL_TEXT)
        bad = np.flatnonzero(values.isna() & ~blank)
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{where}: column {name!r} row {i}: {text[i]!r} is not a number "
                f"(the column is {t} in this file; numbers were expected)"
            )
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    raise DataError(f"{where}: column {name!r} has type {t}; numbers were expected")


def label_keys(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Label values as canonical text (see `class_key`); null where missing."""
    t = col.type
    if pa.types.is_floating(t):
        v = col.to_numpy(zero_copy_only=False)
        finite = v[np.isfinite(v)]
        if np.all(finite == np.round(finite)):
            col = pc.cast(pc.if_else(pc.is_finite(col), col, None), pa.int64())
    elif pa.types.is_boolean(t):
        col = pc.if_else(col, "true", "false")
    elif pa.types.is_dictionary(t):
        col = pc.cast(col, t.value_type)
    return pc.cast(col, pa.string())


class ReadAndClean:
    """The per-file task: read, check against the expected columns, type, mark, hash."""

    def __init__(
        self,
        fs: Any,
        files: list[str],
        fmt: str,
        cols: Columns,
        seed: int,
        fractions: dict[str, float],
        dedupe: str,
        invalid_labels: str,
    ):
        self.fs, self.files, self.fmt, self.cols = fs, files, fmt, cols
        self.seed, self.fractions = seed, fractions
        self.dedupe, self.invalid_labels = dedupe, invalid_labels
        self.class_keys = None if cols.classes is None else [class_key(c) for c in cols.classes]

    def read(self, index: int, data: bytes | None = None) -> pa.Table:
        """File `index` (or `data`, its bytes shipped by the driver), read and cleaned."""
        return self.clean(read_file(self.fs, self.files[index], self.fmt, data), index)

    def clean(self, table: pa.Table, index: int) -> pa.Table:
        path, c = self.files[index], self.cols
        missing = [name for name in c.required if name not in table.column_names]
        if missing:
            where = f" (they are in {c.reference})" if c.reference else ""
            raise DataError(
                f"{path}: column(s) {missing} missing{where}; the file has {table.column_names}"
            )
        known, schema = c.reference_columns, table.schema
        extra = [
            n
            for n in table.column_names
            if known is not None
            and n not in known
            and (is_numeric(schema.field(n).type) or is_categorical(schema.field(n).type))
        ]
        if extra:
            raise DataError(
                f"{path}: column(s) {extra} are not in {c.reference}, the first file, whose "
                "columns the features were inferred from; give every file the same columns, or "
                "list the features in data.numeric and data.categorical"
            )
        n = table.num_rows
        drop = np.zeros(n, dtype=np.int8)
        out: dict[str, Any] = {}

        numeric = {name: to_float(table.column(name), path, name) for name in c.numeric}
        categorical = {}
        for name in c.categorical:
            col = table.column(name)
            if pa.types.is_dictionary(col.type):
                col = pc.cast(col, col.type.value_type)
            categorical[name] = pc.cast(col, pa.string())

        label = self._label(table.column(c.label), path, drop)

        if c.id_column:
            id_col = table.column(c.id_column)
            try:
                ids = pc.cast(id_col, pa.int64() if c.id_kind == "int" else pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(
                    f"{path}: column {c.id_column!r} has type {id_col.type} here; "
                    f"ids were {'integers' if c.id_kind == 'int' else 'text'} in the first file "
                    f"({e})"
                ) from e
            null_id = ~pc.is_valid(ids).to_numpy(zero_copy_only=False)
            drop[(drop == KEEP) & null_id] = MISSING_ID
            id_values = ids.to_numpy(zero_copy_only=False)
            if c.id_kind == "int":
                id_values = np.where(null_id, 0, id_values).astype(np.int64)
        content = combine(
            [hash64(numeric[k]) for k in c.numeric]
            + [hash_text(categorical[k]) for k in c.categorical]
            + [hash64(label) if c.task == "regression" else hash_text(label)]
        )
        if not c.id_column:
            id_values = content.view(np.int64)
            ids = pa.array(id_values)

        for name, policy in c.missing.items():
            if policy == "drop":
                absent = (
                    np.isnan(numeric[name])
                    if name in numeric
                    else ~pc.is_valid(categorical[name]).to_numpy(zero_copy_only=False)
                )
                drop[(drop == KEEP) & absent] = MISSING_VALUE

        u = unit_interval(hash64(id_values, self.seed))
        out["id"] = ids
        out.update({k: pa.array(v) for k, v in numeric.items()})
        out.update(categorical)
        out["_label"] = label if c.task != "regression" else pa.array(label)
        out["_split"] = pa.array(assign_splits(u, self.fractions))
        out["_u"] = pa.array(u)
        out["_dup"] = pa.array(content if self.dedupe != "id" else hash64(id_values))
        out["_file"] = pa.array(np.full(n, index, dtype=np.int32))
        out["_row"] = pa.array(np.arange(n, dtype=np.int64))
        out["_drop"] = pa.array(drop)
        return pa.table(out)

    def _label(self, col: pa.ChunkedArray, path: str, drop: np.ndarray) -> Any:
        name = self.cols.label
        if self.cols.task == "regression":
            y = to_float(col, path, name)
            absent = ~pc.is_valid(col).to_numpy(zero_copy_only=False) | np.isnan(y)
            invalid = ~absent & ~np.isfinite(y)
        else:
            y = label_keys(col)
            absent = ~pc.is_valid(y).to_numpy(zero_copy_only=False)
            if self.class_keys is None:
                invalid = np.zeros(len(y), dtype=bool)
            else:
                known = pc.is_in(y, value_set=pa.array(self.class_keys, pa.string()))
                invalid = ~absent & ~known.fill_null(False).to_numpy(zero_copy_only=False)
        drop[(drop == KEEP) & absent] = MISSING_LABEL
        if invalid.any():
            if self.invalid_labels == "error":
                i = int(np.flatnonzero(invalid)[0])
                expected = (
                    "a finite number"
                    if self.cols.task == "regression"
                    else f"one of the declared classes {self.cols.classes}"
                )
                raise DataError(
                    f"{path}: column {name!r} row {i}: {col[i].as_py()!r} is not {expected} "
                    f"({int(invalid.sum())} such row(s) in this file; "
                    "set data.invalid_labels: drop to drop them)"
                )
            drop[(drop == KEEP) & invalid] = INVALID_LABEL
        return y


def order_keys(batch: pa.Table) -> np.ndarray:
    """A row's place in the input: file index in the high 32 bits, row in the low."""
    files = batch.column("_file").to_numpy(zero_copy_only=False).astype(np.int64)
    return (files << 32) + batch.column("_row").to_numpy(zero_copy_only=False)


def keep_rows(losers: np.ndarray, classes: list | None, task: str):
    """Drop marked rows and the duplicates in `losers` (sorted order keys); encode the label."""
    class_keys = pa.array([class_key(c) for c in classes or []], pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        ok = batch.column("_drop").to_numpy(zero_copy_only=False) == KEEP
        if len(losers):
            order = order_keys(batch)
            pos = np.clip(np.searchsorted(losers, order), 0, len(losers) - 1)
            ok &= losers[pos] != order
        batch = batch.filter(pa.array(ok))
        if task == "regression":
            label = pc.cast(batch.column("_label"), pa.float64())
        else:
            label = pc.cast(pc.index_in(batch.column("_label"), value_set=class_keys), pa.int64())
        batch = batch.drop_columns(["_label", "_drop", "_dup"])
        return batch.append_column("label", label)

    return keep
