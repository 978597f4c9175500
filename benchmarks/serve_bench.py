"""Serving: the dcml Serve app against a plain FastAPI + uvicorn app, in the same run.

    python benchmarks/serve_bench.py [--requests 400] [--rounds 3]

Both HTTP servers wrap the same registered model version (breast-cancer data, an MLP trained for a
few epochs) through the same `Predictor`:

* dcml: `dcml.serving` on Ray Serve (1 replica, dynamic batching, request schema validation),
  behind HAProxy (`--ingress haproxy`, the default) or Serve's Python proxy (`--ingress proxy`);
* plain: FastAPI + uvicorn in one process, `POST /predict` calling `Predictor.predict_records` on
  the JSON body, no validation, no batching.

A load generator (aiohttp, in this process) sends `--requests` requests at concurrency 1, 8 and 32,
each one record or a batch of 64, `--rounds` times per cell with the two servers taking turns, and
prints per server the median requests/s of the rounds and p50/p99 latency over all their requests,
and the ratios. On a 2-core machine the load generator, HAProxy and the replica share the cores. Ray
starts its workers, the replica among them, at nice 15 (`RAY_worker_niceness`), so the load
generator (nice 0) takes the CPU before them; the plain server is started at the replica's niceness
so that both servers get the same share of the cores.

Batch inference has its own benchmark: benchmarks/batch_bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 20  # requests sent before each timed load
sys.path.insert(0, str(ROOT / "platform"))

PLAIN_APP = textwrap.dedent(
    """
    import sys
    from fastapi import FastAPI, Request
    from dcml.predictor import Predictor

    predictor = Predictor.from_dir(sys.argv[1])
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.json()
        rows = body if isinstance(body, list) else [body]
        return {"predictions": predictor.predict_records(rows)}

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    """
)


async def load(url: str, payload, concurrency: int, total: int) -> tuple[float, list[float]]:
    import aiohttp

    latencies: list[float] = []
    queue = list(range(total))

    async def worker(session):
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            async with session.post(url, json=payload) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(WARM_UP, total)):
            async with session.post(url, json=payload) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return total / wall, latencies


def replica(app: str):
    """The Serve replica process of an application (one replica each here)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app}:" in " ".join(p.info["cmdline"] or []):
            return p
    raise RuntimeError(f"no Serve replica of {app!r} found")


def replica_niceness() -> int:
    """The niceness Ray gave the Serve replica (workers start at nice 15: RAY_worker_niceness)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if "ServeReplica" in " ".join(p.info["cmdline"] or []):
            return p.nice()
    raise RuntimeError("no Serve replica process found")


def wait_up(url: str, timeout: float = 60) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise TimeoutError(url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="per cell (0: skip HTTP)")
    ap.add_argument("--rounds", type=int, default=3, help="turns per cell (median requests/s)")
    ap.add_argument("--batch-wait", type=float, default=None, help="serve.batch_wait_s")
    ap.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy")
    ap.add_argument(
        "--without-metrics",
        action="store_true",
        help="also serve the model with serve.metrics off (a second application): the cost of "
        "the model's metrics, as the ratio of the two",
    )
    ap.add_argument("--log-fraction", type=float, default=0.0, help="serve.log_fraction")
    ap.add_argument("--concurrency", default="1,8,32", help="concurrency levels, comma-separated")
    ap.add_argument("--payloads", choices=("both", "1", "64"), default="both")
    args = ap.parse_args()

    import socket

    from dcml.cluster import connect
    from dcml.config import parse_config
    from dcml.data.preprocess import preprocess
    from dcml.pipeline import raw_test_rows, stage_register, stage_train
    from dcml.serving import deploy

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    tmp = Path(tempfile.mkdtemp(prefix="dcml-serve-bench-"))
    cfg = parse_config(
        {
            "name": "bc",
            "cluster": {"serve_ingress": args.ingress},
            "storage": {"root": str(tmp / "store")},
            "train": {"workers": 1, "epochs": 3},
            "serve": {
                "port": free_port(),
                "reload_s": 0,
                "log_fraction": args.log_fraction,
                **({} if args.batch_wait is None else {"batch_wait_s": args.batch_wait}),
            },
        }
    )
    connect(cfg.cluster)
    from dcml.storage import Storage

    dataset = preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)
    _, trained = stage_train(cfg, dataset.ref, run_id="bench", log=lambda _: None)
    mv = stage_register(cfg, dataset, trained.checkpoint_path, {}, ["production"], lambda _: None)
    table = raw_test_rows(cfg, dataset)
    inputs = dataset.preprocessor.inputs
    rows = [{c: r[c] for c in inputs} for r in table.to_pylist()]
    rows = [r for r in rows if all(v == v for v in r.values())]  # no missing values (NaN)

    if args.requests:
        import psutil

        served = deploy(cfg, "bc@production")
        urls = {"dcml": f"{served}/predict"}
        if args.without_metrics:
            bare = cfg.model_copy(deep=True)
            bare.serve.app_name, bare.serve.route_prefix = "bare", "/bare"
            bare.serve.metrics, bare.serve.log_fraction = False, 0.0
            urls["dcml, metrics off"] = f"{deploy(bare, 'bc@production')}/predict"
        plain_port = free_port()
        (tmp / "plain_app.py").write_text(PLAIN_APP)
        niceness = replica_niceness()
        plain = subprocess.Popen(
            [sys.executable, str(tmp / "plain_app.py"), mv.path, str(plain_port)],
            env={"PYTHONPATH": str(ROOT / "platform"), "PATH": "/usr/bin:/bin"},
            preexec_fn=lambda: os.nice(niceness),  # the replica's, so both get the same share
        )
        try:
            wait_up(f"http://127.0.0.1:{plain_port}/docs")
            for url in urls.values():
                wait_up(url.replace("/predict", "/healthz"))
            urls["plain"] = f"http://127.0.0.1:{plain_port}/predict"
            print(
                f"model {mv.ref}; ingress {args.ingress}; {args.rounds} x {args.requests} "
                f"requests per cell; all servers at nice {niceness}; serve.log_fraction "
                f"{args.log_fraction}"
            )
            # the process that answers: each application's replica, the plain server
            procs = {
                server: replica(app)
                for server, app in (("dcml", cfg.serve.app_name), ("dcml, metrics off", "bare"))
                if server in urls
            }
            procs["plain"] = psutil.Process(plain.pid)
            print("| payload | concurrency | server | requests/s | p50 ms | p99 ms | CPU us/req |")
            print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
            ratios = []
            payloads = [("1 record", rows[0]), ("64 records", (rows * 64)[:64])]
            if args.payloads != "both":
                payloads = payloads[:1] if args.payloads == "1" else payloads[1:]
            for name, payload in payloads:
                for conc in map(int, args.concurrency.split(",")):
                    rates: dict[str, list[float]] = {server: [] for server in urls}
                    latencies: dict[str, list[float]] = {server: [] for server in urls}
                    cpu = dict.fromkeys(urls, 0.0)  # CPU seconds of the answering process
                    for _ in range(args.rounds):  # the servers take turns: same machine state
                        for server, url in urls.items():
                            before = sum(procs[server].cpu_times()[:2])
                            rps, lat = asyncio.run(load(url, payload, conc, args.requests))
                            cpu[server] += sum(procs[server].cpu_times()[:2]) - before
                            rates[server].append(rps)
                            latencies[server] += lat
                    got = {}
                    for server, lat in latencies.items():
                        rps = statistics.median(rates[server])
                        p50 = statistics.median(lat) * 1e3
                        p99 = float(np.percentile(lat, 99)) * 1e3
                        per = cpu[server] / (args.rounds * (args.requests + WARM_UP)) * 1e6
                        got[server] = (rps, p50, p99, per)
                        print(
                            f"| {name} | {conc} | {server} | {rps:.0f} | {p50:.1f} | {p99:.1f} "
                            f"| {per:.0f} |"
                        )
                    (dr, d50, _, dc), (pr, p50_, _, _) = got["dcml"], got["plain"]
                    off, _, _, oc = got.get("dcml, metrics off", (dr, d50, 0, dc))
                    ratios.append((name, conc, dr / pr, d50 / p50_, dr / off, dc / oc))
            for name, conc, throughput, latency, metrics, cpu_ratio in ratios:
                print(
                    f"{name}, concurrency {conc}: dcml/plain requests/s {throughput:.2f}x, "
                    f"p50 {latency:.2f}x"
                    + (
                        f"; metrics on/off: requests/s {metrics:.3f}x, replica CPU per request "
                        f"{cpu_ratio:.3f}x"
                        if args.without_metrics
                        else ""
                    )
                )
        finally:
            plain.terminate()
            plain.wait()


if __name__ == "__main__":
    main()
