"""Tuning: ASHA early stopping against no early stopping on the same sweep, in the same run.

    python benchmarks/tune_bench.py [--rows 100000] [--samples 16] [--epochs 27]
    python benchmarks/tune_bench.py --overhead [--rows 100000]

Both sweeps run `dcml tune` (Ray Tune over Ray Train trials) on the same synthetic dataset, search
space (log-uniform lr, depth 1-3), seed (so the same trial configs) and trial budget; one with
`tune.scheduler=asha`, one with `none`. Printed per sweep: wall time, trial-epochs spent, the best
validation ROC AUC, and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "platform"))

from train_bench import write_raw  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--grace", type=int, default=1, help="ASHA's first rung (epochs)")
    ap.add_argument("--reduction", type=int, default=3, help="ASHA's reduction factor")
    ap.add_argument("--workers", type=int, default=1, help="workers per trial (>1: DDP trials)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument(
        "--overhead",
        action="store_true",
        help="instead: 32 one-epoch trials without early stopping; the sweep's wall time against "
        "trials x one trial's time / concurrency",
    )
    args = ap.parse_args()
    if args.overhead:
        args.samples, args.epochs = 32, 1

    from dcml.cluster import connect
    from dcml.config import parse_config
    from dcml.data.preprocess import preprocess
    from dcml.pipeline import stage_tune
    from dcml.storage import Storage

    tmp = Path(tempfile.mkdtemp(prefix="dcml-tune-bench-"))
    write_raw(tmp / "raw", args.rows, 16)
    raw = {
        "storage": {"root": str(tmp / "store")},
        "data": {"name": "bench", "source": str(tmp / "raw"), "dedupe": "none"},
        "model": {"width": 64, "dropout": 0.0},
        "train": {"workers": 1, "batch_size": args.batch, "keep_checkpoints": 1},
        "tune": {
            "space": {
                "train.lr": {"loguniform": [1e-5, 1e-1]},
                "model.depth": {"choice": [1, 2, 3]},
            },
            "num_samples": args.samples,
            "epochs": args.epochs,
            "grace_period": args.grace,
            "reduction_factor": args.reduction,
            "max_concurrent_trials": args.concurrent,
            "workers_per_trial": args.workers,
        },
    }
    cfg = parse_config(raw)
    connect(cfg.cluster)
    dataset = preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    print(
        f"{dataset.manifest['rows']['train']:,} training rows; {args.samples} trials of at most "
        f"{args.epochs} epochs, {args.concurrent} at once of {args.workers} worker(s); batch "
        f"{args.batch}; ASHA grace {args.grace}, reduction factor {args.reduction}"
    )
    if args.overhead:
        overhead(raw, dataset.ref, args)
        return
    results = {}
    for scheduler in ("asha", "none"):
        sweep_cfg = parse_config({**raw, "tune": {**raw["tune"], "scheduler": scheduler}})
        t0 = time.perf_counter()
        _, outcome = stage_tune(sweep_cfg, dataset.ref, f"bench-{scheduler}", lambda _: None)
        wall = time.perf_counter() - t0
        epochs = sum(t["epochs"] for t in outcome.trials)
        best = max(t["val_roc_auc"] for t in outcome.trials if t["status"] != "failed")
        results[scheduler] = (wall, epochs, best)
        print(
            f"{scheduler:<6} wall {wall:7.1f} s  trial-epochs {epochs:4d}  best val ROC AUC "
            f"{best:.4f}  (best {outcome.params})"
        )
    (wa, ea, ba), (wn, en, bn) = results["asha"], results["none"]
    print(
        f"ASHA / none: wall {wa / wn:.2f}x, trial-epochs {ea / en:.2f}x, best metric "
        f"{ba / bn:.4f}x ({100 * (ba - bn) / bn:+.2f}%)"
    )


def overhead(raw: dict, dataset: str, args) -> None:
    """What a sweep costs beyond its trials: wall time against trials x one trial's time (the
    median, from its start to its last report, as Tune times it) / trials at once."""
    import statistics

    from dcml.config import parse_config
    from dcml.pipeline import stage_tune
    from dcml.tune import concurrency

    cfg = parse_config({**raw, "tune": {**raw["tune"], "scheduler": "none"}})
    t0 = time.perf_counter()
    _, outcome = stage_tune(cfg, dataset, "bench-overhead", lambda _: None)
    wall = time.perf_counter() - t0
    seconds = [t["seconds"] for t in outcome.trials if t["seconds"] is not None]
    one = statistics.median(seconds)
    at_once = concurrency(cfg)
    ideal = len(outcome.trials) * one / at_once
    print(
        f"{len(outcome.trials)} trials, {at_once} at once: sweep wall {wall:.1f} s; one "
        f"trial {one:.2f} s (median; {min(seconds):.2f}-{max(seconds):.2f}); trials x one / "
        f"concurrency {ideal:.1f} s; overhead {wall / ideal:.2f}x"
    )


if __name__ == "__main__":
    main()
