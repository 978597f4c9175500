"""The validation gate: checks over every shard after preprocessing, bounded repair, a report.

This is the seed's "preprocessing done? if not, preprocess again": failed checks that have a repair
(drop, or impute, the offending rows) are repaired and everything is checked again, once (unless
`repair: none`); otherwise the stage stops with a report naming the check, column, split, file and
example rows. Nothing is committed unless the gate passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dcml.config_sections import GateConfig
from dcml.data.split import SPLITS

EXAMPLES = 3


class GateError(RuntimeError):
    def __init__(self, report: GateReport):
        self.report = report
        super().__init__("validation gate failed:\n" + report.table())


@dataclass
class CheckResult:
    check: str
    passed: bool
    detail: str
    column: str | None = None
    split: str | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    repairable: bool = False


@dataclass
class GateReport:
    rounds: list[list[CheckResult]] = field(default_factory=list)
    dropped_rows: int = 0  # by repairs
    imputed_values: int = 0  # by repairs

    @property
    def passed(self) -> bool:
        return bool(self.rounds) and all(c.passed for c in self.rounds[-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "dropped_rows": self.dropped_rows,
            "imputed_values": self.imputed_values,
            "rounds": [[asdict(c) for c in r] for r in self.rounds],
        }

    def table(self) -> str:
        lines = [f"{'round':<6}{'check':<15}{'result':<8}detail"]
        for i, checks in enumerate(self.rounds):
            for c in checks:
                detail = c.detail
                if c.examples and not c.passed:
                    detail += "; e.g. " + ", ".join(
                        f"{e['file']} row {e['row']} (id {e['id']})" for e in c.examples
                    )
                lines.append(f"{i:<6}{c.check:<15}{'pass' if c.passed else 'FAIL':<8}{detail}")
        return "\n".join(lines)


@dataclass(frozen=True)
class GateSpec:
    features: list[str]
    task: str
    n_classes: int  # 0 for regression
    files: list[str]
    config: GateConfig

    def problems(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """Per-row masks of repairable problems, keyed 'check:column'."""
        masks = {}
        for c in self.features:
            v = batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
            finite = np.isfinite(v)
            masks[f"finite:{c}"] = ~finite
            masks[f"value_range:{c}"] = finite & (np.abs(v) > self.config.max_abs_value)
        masks["label_domain:label"] = self.bad_labels(batch.column("label"))
        return masks

    def bad_labels(self, label: pa.ChunkedArray) -> np.ndarray:
        v = label.to_numpy(zero_copy_only=False).astype(np.float64)
        if self.task == "regression":
            return ~np.isfinite(v)
        return ~np.isfinite(v) | (v < 0) | (v >= self.n_classes) | (v != np.round(v))

    def expected_types(self) -> dict[str, pa.DataType]:
        types = dict.fromkeys(self.features, pa.float32())
        types["label"] = pa.float64() if self.task == "regression" else pa.int64()
        return types


def block_stats(spec: GateSpec, batch: pa.Table) -> dict:
    """What the checks need from one block: rows and classes per split, problems with examples."""
    split = np.asarray(SPLITS)[batch.column("_split").to_numpy(zero_copy_only=False)]
    files = batch.column("_file").to_numpy(zero_copy_only=False)
    rows = batch.column("_row").to_numpy(zero_copy_only=False)
    ids = batch.column("id")

    def examples(mask: np.ndarray) -> list[dict]:
        return [
            {"id": ids[int(i)].as_py(), "file": spec.files[files[i]], "row": int(rows[i])}
            for i in np.flatnonzero(mask)[:EXAMPLES]
        ]

    schema = {
        c: f"{batch.schema.field(c).type} (expected {t})" if c in batch.column_names else "absent"
        for c, t in spec.expected_types().items()
        if c not in batch.column_names or batch.schema.field(c).type != t
    }
    out = {
        "rows": {s: int((split == s).sum()) for s in SPLITS},
        "schema": schema,
        "problems": {
            k: [int(m.sum()), examples(m)] for k, m in spec.problems(batch).items() if m.any()
        },
        "classes": {},
    }
    if spec.n_classes:
        label = batch.column("label").to_numpy(zero_copy_only=False)
        ok = (label >= 0) & (label < spec.n_classes)
        for s in SPLITS:
            counts = np.bincount(label[(split == s) & ok].astype(int), minlength=spec.n_classes)
            out["classes"][s] = counts.tolist()
    return out


def merge_stats(spec: GateSpec, parts: list[dict]) -> dict:
    total: dict[str, Any] = {
        "rows": dict.fromkeys(SPLITS, 0),
        "schema": {},
        "problems": {},
        "classes": {s: [0] * spec.n_classes for s in SPLITS},
    }
    for p in parts:
        for s in SPLITS:
            total["rows"][s] += p["rows"][s]
            if spec.n_classes:
                total["classes"][s] = [a + b for a, b in zip(total["classes"][s], p["classes"][s])]
        total["schema"].update(p["schema"])
        for k, (n, ex) in p["problems"].items():
            cur = total["problems"].setdefault(k, [0, []])
            cur[0] += n
            cur[1] = (cur[1] + ex)[:EXAMPLES]
    return total


def evaluate(spec: GateSpec, total: dict) -> list[CheckResult]:
    cfg = spec.config
    checks: list[CheckResult] = []
    for c, problem in sorted(total["schema"].items()):
        checks.append(CheckResult("schema", False, f"{c!r}: {problem}", c))
    if not total["schema"]:
        checks.append(CheckResult("schema", True, f"{len(spec.features)} float32 features, label"))
    for name, what in [
        ("finite", "non-finite value(s)"),
        ("value_range", f"value(s) beyond +-{cfg.max_abs_value:g}"),
        ("label_domain", "label(s) outside the task's domain"),
    ]:
        found = sorted(k for k in total["problems"] if k.startswith(name + ":"))
        for k in found:
            n, ex = total["problems"][k]
            col = k.split(":", 1)[1]
            checks.append(CheckResult(name, False, f"{n} {what} in {col!r}", col, None, ex, True))
        if not found:
            checks.append(CheckResult(name, True, f"no {what}"))
    for s in SPLITS:
        rows = total["rows"][s]
        checks.append(
            CheckResult(
                "min_rows",
                rows >= cfg.min_rows_per_split,
                f"{s}: {rows} rows (min {cfg.min_rows_per_split})",
                split=s,
            )
        )
        if spec.n_classes:
            counts = total["classes"][s]
            least = min(counts) / max(rows, 1)
            ok = min(counts) > 0 and least >= cfg.min_class_fraction
            checks.append(
                CheckResult(
                    "class_balance",
                    ok,
                    f"{s}: rows per class {counts}; each class needed"
                    + (
                        f", at least {cfg.min_class_fraction:.1%}" if cfg.min_class_fraction else ""
                    ),
                    "label",
                    s,
                )
            )
    return checks


def repair_batch(spec: GateSpec, batch: pa.Table, mode: str) -> pa.Table:
    """Drop the rows that fail a repairable check, or impute them (bad labels: always dropped)."""
    masks = spec.problems(batch)
    if mode == "drop":
        return batch.filter(pc.invert(pa.array(np.logical_or.reduce(list(masks.values())))))
    limit = spec.config.max_abs_value
    for c in spec.features:
        v = batch.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
        v = np.clip(np.nan_to_num(v, nan=0.0, posinf=limit, neginf=-limit), -limit, limit)
        batch = batch.set_column(batch.schema.get_field_index(c), c, pa.array(v))
    return batch.filter(pc.invert(pa.array(masks["label_domain:label"])))


def run_gate(spec: GateSpec, check_round: Callable[[str | None], dict]) -> tuple[GateReport, dict]:
    """Check, repair and re-check: `check_round(repair)` runs one pass over the data, applying
    `repair` (None in the first round), and returns the merged block statistics.

    A repair is applied to the same preprocessed rows each round, so a round after a repair
    either passes or shows that the repair cannot fix what failed.
    """
    report = GateReport()
    first: dict | None = None
    repair: str | None = None
    while True:
        totals = check_round(repair)
        first = first or totals
        checks = evaluate(spec, totals)
        report.rounds.append(checks)
        failed = [c for c in checks if not c.passed]
        if not failed:
            report.dropped_rows = sum(first["rows"].values()) - sum(totals["rows"].values())
            if repair == "impute":
                report.imputed_values = sum(
                    n for k, (n, _) in first["problems"].items() if not k.startswith("label")
                )
            return report, totals
        repairable = all(c.repairable for c in failed) and spec.config.repair != "none"
        if not repairable or repair is not None:
            raise GateError(report)
        repair = spec.config.repair
