"""The validation gate: checks over every shard after preprocessing, bounded repair, a report.

This is the seed's "preprocessing done? if not, preprocess again": failed checks that have a repair
(dropping the offending rows) are repaired and everything is checked again, at most `rounds` times;
otherwise the stage stops with a report naming the check, column, split, file and example rows.
Nothing is committed unless the gate passes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    repaired_rows: int = 0

    @property
    def passed(self) -> bool:
        return bool(self.rounds) and all(c.passed for c in self.rounds[-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "repaired_rows": self.repaired_rows,
            "rounds": [[asdict(c) for c in r] for r in self.rounds],
        }

    def table(self) -> str:
        lines = [f"{'round':<6}{'check':<16}{'result':<8}detail"]
        for i, checks in enumerate(self.rounds):
            for c in checks:
                detail = c.detail + (f"; e.g. {c.examples}" if c.examples and not c.passed else "")
                lines.append(f"{i:<6}{c.check:<16}{'pass' if c.passed else 'FAIL':<8}{detail}")
        return "\n".join(lines)


def _bad_mask(batch: pa.Table, features: list[str], classes: list[int]) -> tuple[dict, np.ndarray]:
    """Per-feature masks of non-finite values, and the mask of labels outside `classes`."""
    masks = {}
    for c in features:
        v = batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
        masks[c] = ~np.isfinite(v)
    label = batch.column("label").to_numpy(zero_copy_only=False)
    bad_label = ~np.isin(label, classes)
    return masks, bad_label


def _batch_stats(features: list[str], classes: list[int]):
    def stats(batch: pa.Table) -> pa.Table:
        masks, bad_label = _bad_mask(batch, features, classes)
        split = batch.column("_split").to_numpy(zero_copy_only=False)
        label = batch.column("label").to_numpy(zero_copy_only=False)
        ids = batch.column("id").to_pylist()
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else None

        def examples(mask: np.ndarray) -> list[dict]:
            rows = np.flatnonzero(mask)[:EXAMPLES]
            return [{"id": ids[i], "file": paths[i] if paths else None} for i in rows]

        out = {
            "rows": {s: int((split == s).sum()) for s in SPLITS},
            "positives": {s: int(((split == s) & (label == 1)).sum()) for s in SPLITS},
            "nonfinite": {c: [int(m.sum()), examples(m)] for c, m in masks.items() if m.any()},
            "bad_label": [int(bad_label.sum()), examples(bad_label)],
        }
        return pa.table({"stats": [json.dumps(out)]})

    return stats


def _merge(parts: list[dict]) -> dict:
    total = {"rows": dict.fromkeys(SPLITS, 0), "positives": dict.fromkeys(SPLITS, 0)}
    total["nonfinite"], total["bad_label"] = {}, [0, []]
    for p in parts:
        for s in SPLITS:
            total["rows"][s] += p["rows"][s]
            total["positives"][s] += p["positives"][s]
        for c, (n, ex) in p["nonfinite"].items():
            cur = total["nonfinite"].setdefault(c, [0, []])
            cur[0] += n
            cur[1] = (cur[1] + ex)[:EXAMPLES]
        total["bad_label"][0] += p["bad_label"][0]
        total["bad_label"][1] = (total["bad_label"][1] + p["bad_label"][1])[:EXAMPLES]
    return total


def run_checks(ds, features: list[str], classes: list[int], min_rows: int) -> list[CheckResult]:
    parts = ds.map_batches(_batch_stats(features, classes), batch_format="pyarrow").take_all()
    s = _merge([json.loads(p["stats"]) for p in parts])
    checks: list[CheckResult] = []
    for c, (n, ex) in sorted(s["nonfinite"].items()):
        checks.append(
            CheckResult("finite", False, f"{n} non-finite value(s) in {c!r}", c, None, ex, True)
        )
    if not s["nonfinite"]:
        checks.append(CheckResult("finite", True, f"all {len(features)} features finite"))
    n, ex = s["bad_label"]
    checks.append(
        CheckResult(
            "label_domain", n == 0, f"{n} label(s) outside {classes}", "label", None, ex, True
        )
    )
    for split in SPLITS:
        rows, pos = s["rows"][split], s["positives"][split]
        checks.append(
            CheckResult(
                "min_rows", rows >= min_rows, f"{split}: {rows} rows (min {min_rows})", split=split
            )
        )
        checks.append(
            CheckResult(
                "class_balance",
                0 < pos < rows,
                f"{split}: {pos} positive of {rows}; both classes needed",
                "label",
                split,
            )
        )
    return checks


def repair(ds, features: list[str], classes: list[int]):
    """Drop the rows that fail a repairable check (non-finite features, labels out of domain)."""

    def drop_bad(batch: pa.Table) -> pa.Table:
        masks, bad_label = _bad_mask(batch, features, classes)
        bad = np.logical_or.reduce([bad_label, *masks.values()])
        return batch.filter(pc.invert(pa.array(bad)))

    return ds.map_batches(drop_bad, batch_format="pyarrow").materialize()


def run_gate(ds, features: list[str], classes: list[int], min_rows: int, rounds: int):
    """Check, repair and re-check; return (dataset, report) or raise GateError."""
    report = GateReport()
    before = ds.count()
    for attempt in range(rounds + 1):
        checks = run_checks(ds, features, classes, min_rows)
        report.rounds.append(checks)
        failed = [c for c in checks if not c.passed]
        if not failed:
            report.repaired_rows = before - ds.count()
            return ds, report
        if attempt == rounds or not all(c.repairable for c in failed):
            raise GateError(report)
        ds = repair(ds, features, classes)
    raise AssertionError("unreachable")
