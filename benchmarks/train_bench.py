"""Training throughput: `dcml train` on Ray Train against a plain PyTorch loop, in the same run.

    python benchmarks/train_bench.py [--rows 200000] [--epochs 4] [--batch 256] [--threads 1]
    python benchmarks/train_bench.py --ddp 256:256,1024:1024 [--rows 100000] [--epochs 2]

All runs train the same MLP (from dcml's model spec) with AdamW and BCE-with-logits on the same
preprocessed training split, with the same batch size and intra-op threads per process:

* plain PyTorch: the split as one tensor in this process, a random permutation per epoch, a bare
  step loop; no Ray;
* dcml, 1 and 2 Ray Train workers (DDP), each worker's shard cached in memory (`train.cache`);
* dcml, 1 worker streaming its shard from Ray Data every epoch (`train.cache=none`).

Throughput is training rows per second of the steps alone (`train_s` in the history: no
evaluation or checkpoints), the median over epochs. The baseline runs before and after the dcml
runs, and the ratios are against the faster of the two. "Time to first step" is from `fit()` to the
start of the first epoch (Ray is already running: worker start-up, data and model set-up).

Quality: the bundled breast-cancer data with `configs/breast_cancer.yaml`, test-split ROC AUC of
the best checkpoint next to scikit-learn's LogisticRegression trained on the same split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent


def write_raw(folder: Path, rows: int, features: int, shards: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        x = rng.normal(size=(len(part), features))
        logit = (x @ w) / np.sqrt(features) * 3 + 0.5 * np.sin(3 * x[:, 0])
        y = (rng.random(len(part)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        cols = {"id": part, **{f"f{j}": x[:, j] for j in range(features)}, "label": y}
        pq.write_table(pa.table(cols), folder / f"part-{i}.parquet")


def plain_pytorch(x: np.ndarray, y: np.ndarray, spec: dict, epochs: int, batch: int, lr: float):
    """The floor: the same model and batches in a bare loop over in-memory tensors."""
    from dcml.train.model import build_model

    torch.manual_seed(0)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tx, ty = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(tx))
        for i in range(0, len(tx), batch):
            idx = order[i : i + batch]
            loss = loss_fn(model(tx[idx]).squeeze(-1), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(tx) / (time.perf_counter() - t0))
    return statistics.median(rates)


def dcml_run(cfg, dataset, run_id: str) -> tuple[float, float, float]:
    """(rows/s of the training steps, seconds from fit() to the first step, fit() wall time)."""
    from dcml.storage import Storage
    from dcml.train.trainer import build_trainer

    storage = Storage.from_config(cfg)
    rows = dataset.manifest["rows"]["train"]
    t0 = time.time()
    result = build_trainer(cfg, storage, dataset, run_id, progress=False).fit()
    wall = time.time() - t0
    from dcml.train.checkpoint import read_history

    with result.checkpoint.as_directory() as d:
        history = read_history(d)
    first = history[0]["time"] - history[0]["epoch_s"] - t0
    return statistics.median(rows / h["train_s"] for h in history), first, wall


def quality(root: Path) -> tuple[float, float]:
    """(dcml test ROC AUC, LogisticRegression test ROC AUC) on the breast-cancer split."""
    from sklearn.linear_model import LogisticRegression

    from dcml.config import load_config
    from dcml.data.catalog import read_split_numpy
    from dcml.pipeline import stage_preprocess, stage_train
    from dcml.storage import Storage
    from dcml.train.metrics import roc_auc

    cfg = load_config(ROOT / "configs" / "breast_cancer.yaml", [f"storage.root={root}"])
    dv = stage_preprocess(cfg, log=lambda _: None)
    _, outcome = stage_train(cfg, dv.ref, log=lambda _: None)
    storage = Storage.from_config(cfg)
    _, x, y = read_split_numpy(storage, dv, "train")
    _, tx, ty = read_split_numpy(storage, dv, "test")
    lr = LogisticRegression(max_iter=5000).fit(x, y)
    return outcome.test_metrics["test_roc_auc"], roc_auc(ty, lr.predict_proba(tx)[:, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument(
        "--ddp",
        default=None,
        metavar="WIDTH:BATCH,...",
        help="instead: for each model width and batch, 1 worker (1 and 2 threads) against 2 DDP "
        "workers of 1 thread, shards cached (e.g. 256:256,1024:1024)",
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "platform"))

    from dcml.cluster import connect
    from dcml.config import parse_config
    from dcml.data.catalog import read_split_numpy
    from dcml.data.preprocess import preprocess
    from dcml.storage import Storage
    from dcml.train.model import model_spec

    tmp = Path(tempfile.mkdtemp(prefix="dcml-train-bench-"))
    write_raw(tmp / "raw", args.rows, args.features)
    raw = {
        "storage": {"root": str(tmp / "store")},
        "data": {
            "name": "bench",
            "source": str(tmp / "raw"),
            "split": {"train": 0.9, "validation": 0.05, "test": 0.05},
            "dedupe": "none",
        },
        "model": {"depth": args.depth, "width": args.width, "dropout": 0.0},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch,
            "lr": 1e-3,
            "cpus_per_worker": args.threads,
            "keep_checkpoints": 1,
        },
    }
    cfg = parse_config(raw)
    t0 = time.perf_counter()
    connect(cfg.cluster)
    ray_start = time.perf_counter() - t0
    dataset = preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    rows = dataset.manifest["rows"]["train"]
    spec = model_spec(cfg.model, len(dataset.manifest["features"]))
    print(
        f"{rows:,} training rows x {len(dataset.manifest['features'])} features; MLP depth "
        f"{args.depth} width {args.width}; batch {args.batch}; {args.epochs} epochs; "
        f"{args.threads} thread(s) per process; ray.init {ray_start:.1f} s"
    )

    if args.ddp:
        ddp_crossover(raw, dataset, args.ddp)
        return
    torch.set_num_threads(args.threads)
    _, x, y = read_split_numpy(Storage.from_config(cfg), dataset, "train")
    plain = plain_pytorch(x, y, spec, args.epochs, args.batch, 1e-3)
    print(f"{'plain PyTorch (in memory)':<34}{plain:>12,.0f} rows/s")
    results = []

    runs = [
        ("dcml, 1 worker, cached", {"workers": 1, "cache": "device"}),
        ("dcml, 2 workers (DDP), cached", {"workers": 2, "cache": "device"}),
        ("dcml, 1 worker, streamed", {"workers": 1, "cache": "none"}),
    ]
    for name, train in runs:
        run_cfg = parse_config({**raw, "train": {**raw["train"], **train}})
        rate, first, wall = dcml_run(run_cfg, dataset, name.replace(" ", "").replace(",", "-"))
        results.append((name, rate, first, wall))
        print(f"{name:<34}{rate:>12,.0f} rows/s; first step {first:.1f} s; fit() {wall:.1f} s")
    # This machine's speed drifts between minutes: time the baseline again after the dcml runs
    # and compare against the faster of the two.
    again = plain_pytorch(x, y, spec, args.epochs, args.batch, 1e-3)
    plain = max(plain, again)
    print(f"{'plain PyTorch again':<34}{again:>12,.0f} rows/s; ratios against {plain:,.0f}:")
    for name, rate, _, _ in results:
        print(f"  {name:<32}{rate / plain:>6.2f}x plain")

    if not args.skip_quality:
        ours, logistic = quality(tmp / "bc")
        print(
            f"breast cancer, test ROC AUC: dcml {ours:.4f}; "
            f"scikit-learn LogisticRegression {logistic:.4f} (same split)"
        )


def ddp_crossover(raw: dict, dataset, grid: str) -> None:
    """Where 2 DDP workers pay on this machine: rows/s of the steps for 1 worker with 1 and with
    2 intra-op threads, and 2 workers of 1 thread (gloo all-reduce of the gradients per step)."""
    from dcml.config import parse_config

    print(
        "| width | batch | 1 worker, 1 thread | 1 worker, 2 threads | 2 DDP workers "
        "| DDP vs 1x1 | DDP vs 1x2 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cell in grid.split(","):
        width, batch = (int(v) for v in cell.split(":"))
        rates = []
        for workers, threads in ((1, 1), (1, 2), (2, 1)):
            train = {
                **raw["train"],
                "workers": workers,
                "cpus_per_worker": threads,
                "batch_size": batch,
                "cache": "device",
            }
            model = {**raw["model"], "width": width}
            run_cfg = parse_config({**raw, "model": model, "train": train})
            rates.append(dcml_run(run_cfg, dataset, f"ddp-{width}-{batch}-{workers}x{threads}")[0])
        one, two_threads, ddp = rates
        print(
            f"| {width} | {batch} | {one:,.0f} | {two_threads:,.0f} | {ddp:,.0f} | "
            f"{ddp / one:.2f}x | {ddp / two_threads:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
