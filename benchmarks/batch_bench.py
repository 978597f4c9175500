"""Batch inference: `dcml predict` against a plain one-process script, both run from the shell.

    python benchmarks/batch_bench.py [--sizes 2000000:8,20000000:64] [--rounds N] [--ray --cluster]

Sets up a model once (synthetic data, `dcml preprocess`, `dcml train` for one epoch, registered
as batchbench@production), writes the input of each size (rows:shards) by tiling 2M synthetic raw
rows (`dcml data synth`, new ids per copy), then times whole commands as a user meets them:

* plain: `python benchmarks/plain_predict.py MODEL_DIR INPUT OUTPUT`, pyarrow and the same
  `Predictor`, shard by shard, the same output columns;
* dcml: `dcml predict batchbench@production -i INPUT -o OUTPUT` with nothing running (the engine
  that `auto` picks: local threads);
* with --ray, `dcml predict --set predict.engine=ray`: Ray Data on a Ray the command starts;
* with --cluster, the same against a running `ray start --head` (RAY_ADDRESS): Ray Data with the
  cluster's start-up already paid.

With --rounds N the paths take turns N times; the table has the median time and the largest
peak. Peak memory is the largest sum of RSS over the command's process tree (for --cluster, plus the
cluster's processes: their growth during the run counts). Every dcml output is compared with the
plain one value by value: ids and labels must be identical; probabilities are reported as the
rows that differ and the largest difference (torch's intra-op thread count changes float32
rounding in the last bit: the plain script's torch uses every core, dcml's threads one each).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BASE_ROWS = 2_000_000
CONFIG = """\
name: batchbench
storage:
  root: {work}/store
data:
  name: batchbench
  source: {work}/train-raw
  label: label
  id_column: id
  categorical: [color, region]
  impute: median
model:
  depth: 2
  width: 64
train:
  epochs: 1
  batch_size: 1024
"""


def sh(*cmd: str, env: dict | None = None) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tree_rss(pids: list[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited meanwhile
                pass
    return total


def timed(cmd: list[str], env: dict, also: list[int] = ()) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the process tree plus the growth of `also`'s trees, stdout)."""
    before = tree_rss(list(also))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss([proc.pid]) + tree_rss(list(also)) - before)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}\n{err}")
    return wall, peak[0], out.strip()


def make_input(base: pa.Table, rows: int, shards: int, folder: Path) -> None:
    """`rows` rows in `shards` files: the base rows tiled, each copy's ids moved past the last."""
    folder.mkdir()
    step = int(base.column("id").to_numpy().max()) + 1
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        t = base.take(part % base.num_rows)
        ids = t.column("id").to_numpy() + (part // base.num_rows) * step
        t = t.set_column(t.schema.get_field_index("id"), "id", pa.array(ids))
        pq.write_table(t, folder / f"part-{i:05d}.parquet")


def compare(plain: Path, ours: Path) -> str:
    a = pq.read_table(plain).sort_by("id")
    b = pq.read_table(ours).sort_by("id")
    assert a.num_rows == b.num_rows, (a.num_rows, b.num_rows)
    for col in ("id", "label", "model_version"):
        assert a.column(col).equals(b.column(col)), f"{col} differs"
    pa_, pb = a.column("probability").to_numpy(), b.column("probability").to_numpy()
    diff = np.abs(pa_ - pb)
    differ = int((diff > 0).sum())
    return f"ids, labels identical; probability differs in {differ} rows, max {diff.max():.1e}"


def start_cluster(work: Path, env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus",
            str(os.cpu_count()),
            "--include-dashboard=false",
            "--block",
            f"--temp-dir={work}/ray",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    for _ in range(120):
        probe = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={address}"], env=env, capture_output=True
        )
        if probe.returncode == 0:
            return head, address
        time.sleep(1)
    raise SystemExit("the Ray head did not start")


def settle(pids: list[int], seconds: float = 60) -> None:
    """Wait until the processes' trees use under 5% of a core (a cluster that just started
    keeps the cores busy for a while), at most `seconds`."""
    import psutil

    procs = [c for p in map(psutil.Process, pids) for c in (p, *p.children(recursive=True))]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        time.sleep(1)
        if sum(p.cpu_times().user + p.cpu_times().system for p in procs) - before < 0.05:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="2000000:8,20000000:64", help="rows:shards,...")
    ap.add_argument("--ray", action="store_true", help="also Ray Data on a Ray the command starts")
    ap.add_argument("--cluster", action="store_true", help="also Ray Data on a running cluster")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each path (median time)")
    ap.add_argument("--workdir", help="keep inputs and the model here (default: a temporary one)")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="batch-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT / "platform")}
    cfg = work / "config.yaml"
    dcml = str(BIN / "dcml")
    if not (work / "store" / "models" / "batchbench").exists():
        print("setting up: a model trained on 50,000 synthetic rows, 2M raw rows to score")
        cfg.write_text(CONFIG.format(work=work))
        sh(
            dcml,
            "data",
            "synth",
            "--rows",
            "50000",
            "--shards",
            "2",
            "--out",
            f"{work}/train-raw",
            env=env,
        )
        sh(dcml, "preprocess", str(cfg), env=env)
        sh(dcml, "train", str(cfg), "--alias", "production", env=env)
    if not (work / "base").exists():
        sh(
            dcml,
            "data",
            "synth",
            "--rows",
            str(BASE_ROWS),
            "--shards",
            "8",
            "--seed",
            "1",
            "--out",
            f"{work}/base",
            env=env,
        )
    base = pq.read_table(work / "base")
    model_dir = work / "store" / "models" / "batchbench" / "1"

    head, address = start_cluster(work, env) if args.cluster else (None, None)
    try:
        print("| rows | shards | path | wall s | rows/s | vs plain | peak memory | output |")
        print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
        for rows, shards in sizes:
            data = work / f"in-{rows}-{shards}"
            if not data.exists():
                make_input(base, rows, shards, data)
            paths = {
                "plain script": [
                    sys.executable,
                    str(ROOT / "benchmarks" / "plain_predict.py"),
                    str(model_dir),
                    str(data),
                ]
            }
            predict = [dcml, "predict", "batchbench@production", "-c", str(cfg), "-i", str(data)]
            paths["dcml predict (auto: local)"] = predict
            if args.ray:
                paths["dcml predict, Ray Data (starts Ray)"] = [
                    *predict,
                    "-s",
                    "predict.engine=ray",
                ]
            if head is not None:
                paths["dcml predict, Ray Data (running cluster)"] = [
                    *predict,
                    "-s",
                    "predict.engine=ray",
                    "-s",
                    f"cluster.address={address}",
                ]
            if head is not None:
                settle([head.pid])
            runs: dict[str, list[tuple[float, int]]] = {name: [] for name in paths}
            checks = {}
            for _ in range(args.rounds):  # the paths take turns: the machine's speed drifts
                for k, (name, cmd) in enumerate(paths.items()):
                    out = work / "out" / f"run{k}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.parent.mkdir(exist_ok=True)
                    cmd = [*cmd, str(out)] if k == 0 else [*cmd, "-o", str(out)]
                    also = [head.pid] if head and "cluster" in name else []
                    runs[name].append(timed(cmd, env, also)[:2])
                    if k:
                        checks[name] = compare(work / "out" / "run0", out)
            plain_wall = statistics.median(w for w, _ in runs["plain script"])
            for name, measured in runs.items():
                wall = statistics.median(w for w, _ in measured)
                peak = max(p for _, p in measured)
                print(
                    f"| {rows:,} | {shards} | {name} | {wall:.2f} | {rows / wall:,.0f} | "
                    f"{plain_wall / wall:.2f}x | {peak / 2**30:.2f} GiB | "
                    f"{checks.get(name, 'reference')} |",
                    flush=True,
                )
            shutil.rmtree(work / "out")
    finally:
        if head is not None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
