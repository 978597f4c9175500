"""Which column is what: label, id, numeric and categorical features, classes.

Declared in config or inferred from the first raw file's schema; every other file must agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from dcml.config_sections import DataConfig
from dcml.data.errors import DataError


@dataclass(frozen=True)
class Columns:
    label: str
    id_column: str | None
    numeric: list[str]
    categorical: list[str]
    task: str
    classes: list[Any] | None  # declared classes (JSON values); None: inferred later
    missing: dict[str, str] = field(default_factory=dict)  # feature -> mean|median|unknown|drop
    id_kind: str = "int"  # ids are kept as int64 or as strings, whatever each file holds
    reference: str = ""  # the first raw file, whose schema the roles were resolved against
    # its columns, when the features were inferred from them: every other file must have the
    # same (a column only later files have would silently not be a feature)
    reference_columns: list[str] | None = None

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def required(self) -> list[str]:
        return [c for c in [self.id_column, self.label, *self.features] if c]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def is_categorical(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_dictionary(t)
        or pa.types.is_boolean(t)
    )


def infer_columns(d: DataConfig, schema: pa.Schema, reference: str) -> Columns:
    """Resolve the column roles against the schema of `reference` (the first raw file)."""
    names = list(schema.names)
    problems = []
    for fieldname, cols in [
        ("data.label", [d.label]),
        ("data.id_column", [d.id_column] if d.id_column else []),
        ("data.numeric", d.numeric or []),
        ("data.categorical", d.categorical or []),
    ]:
        missing = [c for c in cols if c not in names]
        if missing:
            problems.append(f"{fieldname}: column(s) {missing} not in the data")
    if problems:
        raise DataError(f"{reference}: " + "; ".join(problems) + f"; the file has {names}")

    taken = {d.label, d.id_column, *(d.numeric or []), *(d.categorical or [])}
    numeric = d.numeric
    if numeric is None:
        numeric = [n for n in names if n not in taken and is_numeric(schema.field(n).type)]
    categorical = d.categorical
    if categorical is None:
        categorical = [
            n
            for n in names
            if n not in taken and n not in numeric and is_categorical(schema.field(n).type)
        ]
    for c in numeric:
        if not is_numeric(schema.field(c).type):
            raise DataError(
                f"{reference}: data.numeric: column {c!r} has type {schema.field(c).type}, "
                "not a number; list it under data.categorical"
            )
    both = set(numeric) & set(categorical)
    if both:
        raise DataError(f"data.numeric and data.categorical both list {sorted(both)}")
    if not numeric and not categorical:
        raise DataError(f"{reference}: no feature columns found; the file has {names}")

    missing: dict[str, str] = {}
    for c in numeric:
        missing[c] = d.impute
    for c in categorical:
        missing[c] = "unknown"
    for c, policy in d.impute_columns.items():
        if c not in missing:
            raise DataError(f"data.impute_columns.{c}: not a feature column")
        if c in categorical and policy in ("mean", "median"):
            raise DataError(
                f"data.impute_columns.{c}: categorical columns take 'unknown' or 'drop'"
            )
        if c in numeric and policy == "unknown":
            raise DataError(f"data.impute_columns.{c}: numeric columns take mean, median or drop")
        missing[c] = policy
    return Columns(
        label=d.label,
        id_column=d.id_column,
        numeric=list(numeric),
        categorical=list(categorical),
        task=d.task,
        classes=list(d.classes) if d.classes is not None else None,
        missing=missing,
        id_kind="int"
        if d.id_column and pa.types.is_integer(schema.field(d.id_column).type)
        else "string",
        reference=reference,
        reference_columns=names if d.numeric is None or d.categorical is None else None,
    )


def class_key(value: Any) -> str:
    """The canonical text of a label value, so that 1, 1.0, '1' and True/'true' compare sanely."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
