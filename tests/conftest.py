"""One real local Ray for the whole test session; small data; free ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests

from dcml.config import PipelineConfig, parse_config

REPO = Path(__file__).resolve().parent.parent


# `make test` runs two pytest-xdist workers (-n 2). One runs the tests on its session's Ray, in file
# order (one Ray, module fixtures set up once); beside it, the other usually runs the multi-node
# cluster module (its own `ray start` nodes), the sweeps (on a session Ray of its own) and the tests
# that need no Ray, so that both keep the two cores busy. A worker takes the next module when it
# has two tests left, so where the last ones run varies.
APART = {"tests/test_jobs.py", "tests/test_tune.py", "tests/test_crashes.py"}  # each kept whole
WITHOUT_RAY = {
    "tests/test_config.py",
    "tests/test_gbdt_loop.py",
    "tests/test_layout.py",
    "tests/test_monitor.py",
    "tests/test_registry.py",
    "tests/test_report.py",
    "tests/test_serve_process.py",
    "tests/test_without_ray.py",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's loadgroup cannot group here (pytest 9 node ids ignore the suffix it sets),
    so the grouping is a scheduler of its own: a test's scope is its file for APART, itself for
    the tests without Ray, and "ray" for all the others."""
    if config.getvalue("dist") != "load":  # the user asked for another distribution
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneRayWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::")[0]
            return file if file in APART else nodeid if file in WITHOUT_RAY else "ray"

    return OneRayWorker(config, log)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from dcml.cluster import prepare_env
    from dcml.config_sections import ClusterConfig

    prepare_env(ClusterConfig())
    # Ray's own metrics (exported by every Ray process, gathered by its agents) cost ~9% of the
    # CPU of a Train run on 2 cores, and no test reads them.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Two xdist workers may each run a session Ray: each its own dashboard port, and Ray's state
    # API in its processes (Ray Train's placement-group cleaner asks it whether the controller
    # lives) pointed at it rather than guessing among the Rays on this machine.
    # Set for the processes Ray starts (they inherit it) and unset here again: in this process it
    # would take precedence over every address given to a job client (test_jobs' cluster).
    dashboard = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    try:
        # address="local": never attach to another Ray cluster running on this machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_port=dashboard,
            log_to_driver=True,
        )
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(root: Path, **sections) -> PipelineConfig:
    """A config on a temporary storage root with small, fast settings; `sections` override."""
    raw = {
        "storage": {"root": str(root)},
        "train": {"epochs": 4, "workers": 2},
        "tune": {"num_samples": 2, "epochs": 3, "grace_period": 1},
        "serve": {"port": free_port(), "demo_rows": 2},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return parse_config(raw)


PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def preprocessed(root: Path):
    """The bundled breast-cancer data preprocessed under a storage root: (root, version)."""
    from dcml.data.preprocess import preprocess
    from dcml.storage import Storage

    cfg = make_config(root)
    return root, preprocess(cfg, Storage.from_config(cfg), log=lambda _: None)


def trained_in_process(cfg: PipelineConfig, dataset, folder: Path) -> str:
    """The training loop run in this process (`fit_local`, no Ray Train start-up) on a stored
    dataset version, its checkpoints in `folder`: the last checkpoint's path."""
    import pyarrow as pa
    import torch

    from dcml.storage import Storage
    from dcml.train.ingest import split_tables
    from dcml.train.loop import fit_local

    storage = Storage.from_config(cfg)
    splits = {
        s: pa.concat_tables(split_tables(storage, dataset, s)) for s in ("train", "validation")
    }
    m = dataset.manifest
    threads = torch.get_num_threads()  # the loop sets its own, as a worker would
    try:
        fit_local(cfg, splits, str(folder), m["features"], m["task"], m["classes"])
    finally:
        torch.set_num_threads(threads)
    return str(sorted(folder.glob("checkpoint_*"))[-1])


def start_dcml(tmp_path: Path, raw: dict, *args: str) -> subprocess.Popen:
    """`dcml ARGS CONFIG` as a real CLI process joined to this session's Ray, in a process group
    of its own (so a test can kill it whole); its output goes to tmp_path/dcml.log."""
    import ray
    import yaml

    raw = {**raw, "cluster": {"address": ray.get_runtime_context().gcs_address}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    dcml = Path(sys.executable).with_name("dcml")
    return subprocess.Popen(
        [str(dcml), *args[:1], str(tmp_path / "cfg.yaml"), *args[1:]],
        stdout=open(tmp_path / "dcml.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


# moto's server as `python -m moto.server` runs it, but taking one request at a time: moto 5.2.5
# checks If-None-Match and then stores the object, unlocked, in a threaded server, so two
# concurrent creates of one key can both succeed (S3 lets exactly one win: the other gets 412).
# Two writers claiming one version number at once met that race here.
MOTO_ONE_AT_A_TIME = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app,
)
app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
def one_at_a_time(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple("127.0.0.1", int(sys.argv[1]), one_at_a_time, threaded=True,
           request_handler=MotoRequestHandler)
"""


@contextmanager
def moto_s3(bucket: str):
    """An S3 API server on loopback (moto's server mode) with `bucket`; yields fsspec options."""
    from dcml.storage import Storage

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO_ONE_AT_A_TIME, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:  # its first answer can take seconds on a busy machine (moto imports lazily)
                requests.get(url, timeout=10)
                break
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)
        options = {"key": "testing", "secret": "testing", "endpoint_url": url}
        Storage(f"s3://{bucket}", options).fs.mkdir(bucket)
        yield options
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def register_tiny_model(storage, folder: Path, **preprocessor) -> str:
    """`tiny_categorical_model`, saved in `folder` and copied to `storage` as a checkpoint,
    registered as cat@N there (`preprocessor`: fields of its state to replace): its reference."""
    from dcml import registry

    meta = tiny_categorical_model(folder)
    meta["preprocessor"].update(preprocessor)
    checkpoint = storage.path("checkpoints", "tiny")
    storage.fs.makedirs(checkpoint, exist_ok=True)
    for f in folder.iterdir():
        storage.fs.put_file(str(f), f"{checkpoint}/{f.name}")
    return registry.register(storage, "cat", checkpoint, meta).ref


def tiny_categorical_model(folder: Path) -> dict:
    """An untrained model over `x` and `color` (categories seen in training: blue, red), saved in
    `folder`; returns its metadata. For tests of the request schema, not of the model."""
    from dcml.data.transforms import Preprocessor
    from dcml.train.checkpoint import save_checkpoint
    from dcml.train.model import build_model
    from dcml.train.step import make_optimizer

    pre = Preprocessor(
        numeric=["x"],
        categorical=["color"],
        fill={"x": 0.0},
        clip={},
        center={"x": 0.0},
        scale={"x": 1.0},
        categories={"color": ["blue", "red"]},
    )
    spec = {
        "kind": "mlp",
        "n_features": len(pre.output_features),
        "n_outputs": 1,
        "depth": 0,
        "width": 1,
        "activation": "relu",
        "dropout": 0.0,
    }
    model = build_model(spec)
    save_checkpoint(str(folder), model, make_optimizer(model, "adam", 1e-3, 0), 0, {})
    return {
        "preprocessor": pre.to_json(),
        "model_spec": spec,
        "classes": ["no", "yes"],
        "config": {"data": {"id_column": "id"}},  # what batch prediction reads
    }


# ---- data on disk ----


def quiet(_: str) -> None:
    pass


def write_shards(folder, table: pa.Table, shards: int, fmt: str = "parquet") -> list:
    from dcml.data.synth import encode

    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"parquet": "parquet", "csv": "csv", "json": "jsonl"}[fmt]
    paths = []
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), shards)):
        path = folder / f"part-{i}.{suffix}"
        path.write_bytes(encode(table.take(pa.array(part)), fmt))
        paths.append(path)
    return paths


def run(tmp_path, name="syn", source=None, **data):
    """Preprocess the files under tmp_path/raw (or `source`): (dataset version, storage)."""
    from dcml.data.preprocess import preprocess
    from dcml.storage import Storage

    cfg = make_config(
        tmp_path / "store", data={"name": name, "source": str(source or tmp_path / "raw"), **data}
    )
    return preprocess(cfg, Storage.from_config(cfg), log=quiet), Storage.from_config(cfg)


# ---- the run report in headless Chromium ----

CHROMIUM = "/usr/bin/chromium"


def images(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)


# Records, once the page has loaded, how many images decoded and how tall the page is.
CHECK = """<script>
addEventListener("load", () => {
  const imgs = [...document.images];
  const b = document.body.dataset;
  b.images = imgs.length;
  b.decoded = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  b.sections = document.querySelectorAll("h2").length;
  b.height = document.documentElement.scrollHeight;
});
</script>"""


def render(report: Path, tmp_path: Path) -> dict[str, int]:
    """Open a copy of the report with CHECK in headless Chromium; what CHECK recorded."""
    page = tmp_path / "rendered.html"
    page.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, f"chromium printed no page (exit {out.returncode}): {out.stderr[-2000:]}"
    return {k: int(v) for k, v in re.findall(r'data-(\w+)="(\d+)"', body[1])}


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (Debian's chromium package)"
)
