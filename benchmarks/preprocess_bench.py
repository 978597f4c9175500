"""Preprocessing throughput: `dcml preprocess` on Ray Data against a plain single-process script.

Both read the same synthetic shards (`dcml data synth`) and do the same work: drop rows without a
label, drop duplicates, split by a seeded hash of the id, fit imputation, quantile clipping,
standard scaling and one-hot categories on the training split, transform, check (finite values,
classes per split) and write Parquet per split. The baseline is pyarrow + NumPy in one process, in
a child process of its own so that its peak memory is its own.

    python benchmarks/preprocess_bench.py --sizes 500000:8,2000000:16,5000000:32

prints, per size, rows/s of each, the ratio (dcml / baseline) and peak memory. A tiny warm-up run
first starts Ray's worker processes, as on a cluster that is already up. Peak memory of dcml
is the largest sum of RSS over the driver and every Ray process it started (object-store pages
shared between processes can count more than once, so it is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}
CLIP = (0.001, 0.999)


# --- the baseline: one process, pyarrow + NumPy ---------------------------------------------------


def baseline(raw: str, out: str, seed: int = 0) -> dict:
    from dcml.data.split import SPLITS, assign_splits, combine, hash64, hash_text, unit_interval

    t0 = time.perf_counter()
    files = sorted(Path(raw).rglob("*.parquet"))  # synth commits them under a tx-* folder
    table = pa.concat_tables([pq.read_table(f) for f in files])
    n_raw = table.num_rows
    numeric = [c for c in table.column_names if c.startswith("num_")]
    categorical = ["color", "region"]

    table = table.filter(pc.is_valid(table.column("label")))  # missing labels
    x = {c: table.column(c).to_numpy(zero_copy_only=False) for c in numeric}
    cats = {c: table.column(c).to_numpy(zero_copy_only=False) for c in categorical}
    label = table.column("label").to_numpy()
    content = combine(
        [hash64(x[c]) for c in numeric]
        + [hash_text(table.column(c)) for c in categorical]
        + [hash_text(pc.cast(table.column("label"), pa.string()))]
    )
    _, first = np.unique(content, return_index=True)  # duplicates: keep the first copy
    keep = np.zeros(len(content), bool)
    keep[first] = True
    ids = table.column("id").to_numpy()[keep]
    x = {c: v[keep] for c, v in x.items()}
    cats = {c: v[keep] for c, v in cats.items()}
    label = label[keep]
    split = np.asarray(SPLITS)[assign_splits(unit_interval(hash64(ids, seed)), FRACTIONS)]
    train = split == "train"

    # fit on the training split
    stats = {}
    for c in numeric:
        v = x[c][train]
        v = v[np.isfinite(v)]
        lo, hi = np.quantile(v, CLIP)
        clipped = np.clip(v, lo, hi)
        stats[c] = (lo, hi, clipped.mean(), clipped.std() or 1.0)
    vocab = {}
    for c in categorical:
        present = pc.drop_null(pa.array(cats[c][train], pa.string()))
        counts = pc.value_counts(present)
        ranked = sorted(zip(counts.field(1).to_pylist(), counts.field(0).to_pylist()))
        vocab[c] = sorted(v for _, v in sorted(ranked, key=lambda t: (-t[0], t[1]))[:64])

    # transform
    columns = {"id": ids, "label": label}
    for c in numeric:
        lo, hi, mean, std = stats[c]
        v = np.where(np.isnan(x[c]), mean, x[c])
        columns[c] = ((np.clip(v, lo, hi) - mean) / std).astype(np.float32)
    for c in categorical:
        idx = pc.index_in(pa.array(cats[c], pa.string()), value_set=pa.array(vocab[c]))
        idx = idx.fill_null(len(vocab[c])).to_numpy(zero_copy_only=False)
        for j, name in enumerate([*vocab[c], "<unknown>"]):
            columns[f"{c}={name}"] = (idx == j).astype(np.float32)
    features = [k for k in columns if k not in ("id", "label")]

    # check
    for c in features:
        assert np.isfinite(columns[c]).all(), c
    for s in FRACTIONS:
        assert set(np.unique(label[split == s])) == {0, 1}, s

    # write per split
    result = pa.table(columns)
    rows = {}
    for s in FRACTIONS:
        part = result.filter(pa.array(split == s))
        os.makedirs(f"{out}/{s}", exist_ok=True)
        pq.write_table(part, f"{out}/{s}/part-0.parquet")
        rows[s] = part.num_rows
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rows_in": n_raw, "rows_out": rows, "peak_bytes": peak}


# --- dcml ----------------------------------------------------------------------------------------


class PeakRss:
    """Samples the RSS of this process and all its descendants (the embedded Ray)."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self):
        self.baseline = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def dcml_run(raw: str, store: str, name: str) -> dict:
    from dcml.config import parse_config
    from dcml.data.preprocess import preprocess
    from dcml.storage import Storage

    cfg = parse_config(
        {
            "storage": {"root": store},
            "data": {
                "name": name,
                "source": raw,
                "categorical": ["color", "region"],
                "clip_quantiles": list(CLIP),
            },
        }
    )
    with PeakRss() as mem:
        t0 = time.perf_counter()
        dv = preprocess(cfg, Storage.from_config(cfg), log=lambda m: print("   ", m, flush=True))
        seconds = time.perf_counter() - t0
    rows = {s: dv.manifest["rows"][s] for s in FRACTIONS}
    return {
        "seconds": seconds,
        "rows_in": dv.manifest["rows"]["raw"],
        "rows_out": rows,
        "peak_bytes": mem.peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="5000000:32", help="rows:shards,... (default 5000000:32)")
    ap.add_argument("--workdir", default="/tmp/dcml-bench", help="data and outputs go here")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray")
    ap.add_argument("--baseline-only", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_only:
        print(json.dumps(baseline(*args.baseline_only)))
        return

    import ray

    from dcml.cluster import prepare_env
    from dcml.config_sections import ClusterConfig
    from dcml.data.synth import write_synth

    prepare_env(ClusterConfig())
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    work = Path(args.workdir)
    # Warm-up: Ray's worker processes start once per cluster, not once per job; a tiny run starts
    # them so the timings below are of a warm cluster, as a shared cluster is.
    warm = work / "raw-warmup"
    if not warm.exists():
        write_synth(str(warm), 20_000, 2, seed=1)
    dcml_run(str(warm), str(work / "store-warmup"), "warmup")
    subprocess.run(["rm", "-rf", str(work / "store-warmup")])
    results = []
    for size in args.sizes.split(","):
        rows, shards = (int(v) for v in size.split(":"))
        raw = work / f"raw-{rows}-{shards}"
        if not raw.exists():
            t0 = time.perf_counter()
            write_synth(str(raw), rows, shards, seed=0)
            print(f"synth {rows} rows in {shards} shards: {time.perf_counter() - t0:.1f}s")
        run = f"{time.time_ns()}"
        ours = dcml_run(str(raw), str(work / f"store-{run}"), f"bench{rows}")
        child = subprocess.run(
            [sys.executable, __file__, "--baseline-only", str(raw), str(work / f"base-{run}")],
            check=True,
            capture_output=True,
            text=True,
        )
        base = json.loads(child.stdout.strip().splitlines()[-1])
        assert base["rows_in"] == ours["rows_in"], (base, ours)
        ratio = base["seconds"] / ours["seconds"]
        results.append((rows, shards, ours, base, ratio))
        print(
            f"{rows} rows / {shards} shards: dcml {ours['rows_in'] / ours['seconds']:,.0f} rows/s "
            f"({ours['seconds']:.1f}s), baseline {base['rows_in'] / base['seconds']:,.0f} rows/s "
            f"({base['seconds']:.1f}s), ratio {ratio:.2f}x; out rows dcml {ours['rows_out']} "
            f"baseline {base['rows_out']}",
            flush=True,
        )
        subprocess.run(["rm", "-rf", str(work / f"store-{run}"), str(work / f"base-{run}")])

    print(f"\n{args.cpus} CPUs for Ray")
    print(
        f"{'rows':>10} {'shards':>6} {'dcml rows/s':>12} {'base rows/s':>12} {'ratio':>6} "
        f"{'dcml peak':>10} {'base peak':>10}"
    )
    for rows, shards, ours, base, ratio in results:
        print(
            f"{rows:>10} {shards:>6} {ours['rows_in'] / ours['seconds']:>12,.0f} "
            f"{base['rows_in'] / base['seconds']:>12,.0f} {ratio:>5.2f}x "
            f"{ours['peak_bytes'] / 2**30:>8.2f}Gi {base['peak_bytes'] / 2**30:>8.2f}Gi"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
