"""Gradient-boosted trees: `model.family: gbdt` on Ray Train against plain `xgboost.train`, in
the same run.

    python benchmarks/gbdt_bench.py [--rows 200000] [--features 20] [--rounds 100] [--threads 1]

Every run boosts the same trees (dcml's XGBoost parameters: depth 6, eta 0.1, hist, 256 bins)
for a fixed number of rounds (no early stopping) on the same preprocessed training split:

* plain `xgboost.train` in this process: the split as one numpy array, one DMatrix, no Ray, no
  evaluation;
* dcml, 1 and 2 Ray Train workers (`XGBoostTrainer`; 2 workers build each tree together over
  XGBoost's collective), each worker scoring the whole validation split after every round
  (dcml's early stopping and learning curves) and checkpointing every `checkpoint_every` rounds.

Throughput is training rows x rounds per second: for dcml, of the rounds alone (the sum of
`epoch_s` over the history: each round with its evaluation and reports, not the workers'
start-up or the data's loading); `fit()` is the whole call. The baseline runs before and after
the dcml runs, and the ratios are against the faster of the two.

Quality: the bundled breast-cancer data, test-split ROC AUC of dcml's gbdt (trained in this
process, early stopping on) next to scikit-learn's HistGradientBoosting on the same split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench import write_raw  # noqa: E402


def plain_xgboost(x, y, params: dict, rounds: int) -> float:
    """The floor: rows x rounds per second of `xgboost.train` on one in-memory DMatrix."""
    import xgboost as xgb

    params = {k: v for k, v in params.items() if k != "eval_metric"}
    dtrain = xgb.DMatrix(x, label=y, nthread=params["nthread"])
    t0 = time.perf_counter()
    xgb.train(params, dtrain, num_boost_round=rounds)
    return len(x) * rounds / (time.perf_counter() - t0)


def dcml_run(cfg, dataset, run_id: str) -> tuple[float, float]:
    """(rows x rounds per second of the rounds, seconds of fit())."""
    from dcml.storage import Storage
    from dcml.train.checkpoint import parse_history
    from dcml.train.trainer import build_trainer

    storage = Storage.from_config(cfg)
    t0 = time.perf_counter()
    result = build_trainer(cfg, storage, dataset, run_id, progress=False).fit()
    wall = time.perf_counter() - t0
    with storage.fs.open(f"{result.checkpoint.path}/history.csv", "rb") as f:
        history = parse_history(f.read().decode())
    rounds_s = sum(h["epoch_s"] for h in history)
    return dataset.manifest["rows"]["train"] * len(history) / rounds_s, wall


def quality(folder: Path) -> tuple[float, float]:
    """Breast cancer: dcml's gbdt and HistGradientBoosting, test ROC AUC on the same split."""
    import pyarrow as pa
    from sklearn.ensemble import HistGradientBoostingClassifier

    from dcml.config import load_config
    from dcml.data.catalog import read_split_numpy
    from dcml.data.preprocess import preprocess
    from dcml.storage import Storage
    from dcml.train.ingest import split_tables
    from dcml.train.loop import fit_local
    from dcml.train.metrics import roc_auc
    from dcml.train.outputs import evaluate_checkpoint

    cfg = load_config(
        ROOT / "configs" / "breast_cancer.yaml",
        [f"storage.root={folder}", "model.family=gbdt"],
    )
    storage = Storage.from_config(cfg)
    dv = preprocess(cfg, storage, log=lambda _: None)
    splits = {s: pa.concat_tables(split_tables(storage, dv, s)) for s in ("train", "validation")}
    m = dv.manifest
    fit_local(cfg, splits, str(folder / "run"), m["features"], m["task"], m["classes"])
    checkpoint = str(sorted((folder / "run").glob("checkpoint_*"))[-1])
    ours = evaluate_checkpoint(storage, dv, checkpoint, "test")[0]["roc_auc"]
    _, x, y = read_split_numpy(storage, dv, "train")
    _, xt, yt = read_split_numpy(storage, dv, "test")
    model = HistGradientBoostingClassifier(random_state=0).fit(x, y)
    return ours, roc_auc(yt, model.predict_proba(xt)[:, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="XGBoost threads per process")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()

    from dcml.cluster import connect
    from dcml.config import parse_config
    from dcml.data.catalog import read_split_numpy
    from dcml.data.preprocess import preprocess
    from dcml.storage import Storage
    from dcml.train.gbdt import booster_params

    tmp = Path(tempfile.mkdtemp(prefix="dcml-gbdt-bench-"))
    write_raw(tmp / "raw", args.rows, args.features)
    raw = {
        "storage": {"root": str(tmp / "store")},
        "data": {
            "name": "bench",
            "source": str(tmp / "raw"),
            "split": {"train": 0.9, "validation": 0.05, "test": 0.05},
            "dedupe": "none",
        },
        "model": {
            "family": "gbdt",
            "gbdt": {"rounds": args.rounds, "early_stopping_rounds": 0, "checkpoint_every": 10},
        },
        "train": {"cpus_per_worker": args.threads, "keep_checkpoints": 1},
    }
    cfg = parse_config(raw)
    connect(cfg.cluster)
    dataset = preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    rows = dataset.manifest["rows"]["train"]
    print(
        f"{rows:,} training rows x {len(dataset.manifest['features'])} features; "
        f"{args.rounds} rounds of depth-6 trees; {args.threads} thread(s) per process"
    )
    _, x, y = read_split_numpy(Storage.from_config(cfg), dataset, "train")
    params = booster_params(cfg, "binary", 2, None)
    plain = plain_xgboost(x, y, params, args.rounds)
    print(f"{'plain xgboost.train (in memory)':<34}{plain:>14,.0f} rows x rounds/s")
    results = []
    for workers in (1, 2):
        run_cfg = parse_config({**raw, "train": {**raw["train"], "workers": workers}})
        rate, wall = dcml_run(run_cfg, dataset, f"gbdt-{workers}w")
        name = f"dcml gbdt, {workers} worker(s)"
        results.append((name, rate))
        print(f"{name:<34}{rate:>14,.0f} rows x rounds/s; fit() {wall:.1f} s")
    again = plain_xgboost(x, y, params, args.rounds)
    plain = max(plain, again)
    print(f"{'plain xgboost.train again':<34}{again:>14,.0f} rows x rounds/s; ratios:")
    for name, rate in results:
        print(f"  {name:<32}{rate / plain:>6.2f}x plain")

    if not args.skip_quality:
        ours, hgb = quality(tmp / "bc")
        print(
            f"breast cancer, test ROC AUC: dcml gbdt {ours:.4f}; "
            f"scikit-learn HistGradientBoosting {hgb:.4f} (same split)"
        )


if __name__ == "__main__":
    main()
